#include "cli/simulate_cmd.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "bench/workload.h"
#include "cli/plan.h"
#include "common/json.h"
#include "common/mapped_file.h"
#include "common/status_macros.h"

namespace strata {
namespace {

constexpr double kMiB = 1024.0 * 1024.0;
constexpr int kMaxWorkers = 4096;

absl::StatusOr<int64_t> IntIn(const Args& args, const std::string& name, int64_t fallback,
                              int64_t least, int64_t most) {
  ASSIGN_OR_RETURN(const int64_t v, args.GetInt(name, fallback));
  if (v < least || v > most) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be ", least, " to ", most, ", not ", v));
  }
  return v;
}

absl::StatusOr<double> NonNegative(const Args& args, const std::string& name, double fallback) {
  ASSIGN_OR_RETURN(const double v, args.GetDouble(name, fallback));
  if (!(v >= 0) || !std::isfinite(v)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " must be 0 or more, not ", v));
  }
  return v;
}

absl::StatusOr<LengthRange> Range(const Args& args, const std::string& name,
                                  const std::string& fallback) {
  absl::StatusOr<LengthRange> r = ParseLengthRange(args.Get(name).value_or(fallback));
  if (!r.ok() || r->min < 1 || r->max > 1000000) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be N or MIN:MAX with 1 <= MIN <= MAX <= 1000000, not \"",
                     args.Get(name).value_or(fallback), "\""));
  }
  return *r;
}

absl::StatusOr<WorkloadOptions> WorkloadFromArgs(const Args& args) {
  WorkloadOptions o;
  o.kind = args.Get("workload").value_or("random");
  if (o.kind != "random" && o.kind != "shared-prefix" && o.kind != "multi-turn") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--workload must be random, shared-prefix or multi-turn, not \"", o.kind, "\""));
  }
  ASSIGN_OR_RETURN(o.num_requests, IntIn(args, "requests", 1000, 1, 10000000));
  ASSIGN_OR_RETURN(o.prompt_tokens, Range(args, "prompt-tokens", "1024"));
  ASSIGN_OR_RETURN(o.output_tokens, Range(args, "output-tokens", "256"));
  ASSIGN_OR_RETURN(o.shared_prefix_tokens,
                   IntIn(args, "shared-prefix-tokens", o.shared_prefix_tokens, 0, 1000000));
  ASSIGN_OR_RETURN(o.shared_fraction, NonNegative(args, "shared-fraction", o.shared_fraction));
  if (o.shared_fraction > 1) {
    return absl::InvalidArgumentError("--shared-fraction must be in [0, 1]");
  }
  ASSIGN_OR_RETURN(const int64_t prefixes,
                   IntIn(args, "shared-prefixes", o.num_shared_prefixes, 1, 100000));
  o.num_shared_prefixes = static_cast<int>(prefixes);
  ASSIGN_OR_RETURN(const int64_t turns, IntIn(args, "turns", o.turns, 1, 1000));
  o.turns = static_cast<int>(turns);
  ASSIGN_OR_RETURN(o.turn_tokens, Range(args, "turn-tokens", "40"));
  ASSIGN_OR_RETURN(o.think_time_ms, NonNegative(args, "think-time-ms", o.think_time_ms));
  ASSIGN_OR_RETURN(const int64_t replies, IntIn(args, "replies-in-history", 1, 0, 1));
  o.replies_in_history = replies == 1;
  if (o.think_time_ms > 1e9)
    return absl::InvalidArgumentError("--think-time-ms must be at most 1e9");
  ASSIGN_OR_RETURN(const int64_t fine_tunes, IntIn(args, "fine-tunes", 0, 0, 1000000));
  o.fine_tunes = static_cast<int>(fine_tunes);
  ASSIGN_OR_RETURN(o.fine_tune_zipf, NonNegative(args, "fine-tune-zipf", o.fine_tune_zipf));
  ASSIGN_OR_RETURN(o.base_fraction, NonNegative(args, "base-fraction", 0));
  if (o.base_fraction > 1) return absl::InvalidArgumentError("--base-fraction must be in [0, 1]");
  ASSIGN_OR_RETURN(const int64_t seed, IntIn(args, "seed", 1, 0, int64_t{1} << 62));
  o.seed = static_cast<uint64_t>(seed);
  o.vocab_size = 1 << 20;  // token ids only name blocks here
  // The workload is made in full before it runs: bound its tokens (4 bytes each).
  const double tokens_per_request =
      static_cast<double>(o.prompt_tokens.max) +
      (o.kind == "shared-prefix" ? static_cast<double>(o.shared_prefix_tokens) : 0) +
      (o.kind == "multi-turn" ? static_cast<double>(o.turns) * o.turn_tokens.max : 0) +
      (o.kind == "multi-turn" && o.replies_in_history
           ? static_cast<double>(o.turns) * static_cast<double>(o.output_tokens.max)
           : 0);
  if (tokens_per_request * static_cast<double>(o.num_requests) > 5e8) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--requests %d of up to %.0f prompt tokens each is past the simulator's 500 million "
        "tokens: use fewer requests",
        o.num_requests, tokens_per_request));
  }
  return o;
}

absl::StatusOr<std::vector<double>> Rates(const Args& args) {
  if (args.Has("rate") && args.Has("rates")) {
    return absl::InvalidArgumentError("give --rate or --rates, not both");
  }
  std::vector<double> rates;
  if (args.Has("rates")) {
    for (absl::string_view part : absl::StrSplit(*args.Get("rates"), ',')) {
      double r;
      if (!absl::SimpleAtod(part, &r) || !(r >= 1e-6) || r > 1e6) {
        return absl::InvalidArgumentError(
            absl::StrCat("--rates must be a comma-separated list of rates from 1e-6 to 1e6, not \"",
                         *args.Get("rates"), "\""));
      }
      rates.push_back(r);
    }
    std::sort(rates.begin(), rates.end());
  } else {
    ASSIGN_OR_RETURN(const double r, args.GetDouble("rate", 4));
    if (!(r >= 1e-6) || r > 1e6) {
      return absl::InvalidArgumentError(absl::StrCat("--rate must be 1e-6 to 1e6, not ", r));
    }
    rates.push_back(r);
  }
  return rates;
}

// The simulated cluster and where its costs come from.
struct Setup {
  SimConfig config;
  std::string source;
};

absl::StatusOr<Setup> SetupFromArgs(const Args& args, const WorkloadOptions& wo,
                                    const std::vector<Conversation>& sample) {
  Setup s;
  s.config.replies_in_history = wo.replies_in_history;
  SimWorkerConfig& w = s.config.worker;
  double block_bytes = 0;  // one block as the disk tier stores it
  if (args.Has("profile")) {
    if (args.Has("model") || args.Has("gpu")) {
      return absl::InvalidArgumentError("give --profile or --model with --gpu, not both");
    }
    const std::string path = *args.Get("profile");
    ASSIGN_OR_RETURN(const std::string text, ReadFileToString(path));
    ASSIGN_OR_RETURN(const EngineProfile p, EngineProfileFromJson(text, path));
    s.config.cost = p.cost;
    s.config.request_overhead_s = p.request_overhead_s;
    w.delta_load_s = p.delta_load_s;
    block_bytes = static_cast<double>(p.block_bytes);
    w.kv_blocks = p.kv_blocks;
    w.block_tokens = p.block_tokens;
    w.max_batch_tokens = p.max_batch_tokens;
    w.max_running_sequences = p.max_running_sequences;
    s.source = absl::StrCat("profile ", path, " (", p.model, " on ", p.machine, ")");
    ASSIGN_OR_RETURN(w.max_batch_tokens,
                     IntIn(args, "max-batch-tokens", w.max_batch_tokens, 1, 1000000000));
    ASSIGN_OR_RETURN(w.max_running_sequences,
                     IntIn(args, "max-running-sequences", w.max_running_sequences, 1, 1000000));
  } else {
    // The plan's worker for the workload's mean request: its KV cache and its batch cap.
    ASSIGN_OR_RETURN(const ModelConfig model, PlanModelFromArgs(args));
    ASSIGN_OR_RETURN(const GpuSpec gpu, PlanGpuFromArgs(args));
    ASSIGN_OR_RETURN(const PlanOptions o, PlanOptionsFromArgs(args, gpu));
    double prompt = 0, output = 0, n = 0;
    for (const Conversation& c : sample) {
      double replies = 0;  // earlier turns' outputs, resent in this one's prompt
      for (const Turn& t : c.turns) {
        prompt += static_cast<double>(t.prompt.size()) + replies;
        output += static_cast<double>(t.output_tokens);
        if (wo.replies_in_history) replies += static_cast<double>(t.output_tokens);
        ++n;
      }
    }
    Workload pw;
    pw.prompt_tokens = std::max<int64_t>(1, std::llround(prompt / std::max(1.0, n)));
    pw.output_tokens = std::max<int64_t>(1, std::llround(output / std::max(1.0, n)));
    pw.fine_tunes = wo.fine_tunes;
    ASSIGN_OR_RETURN(const int64_t resident, IntIn(args, "resident-deltas", 0, 0, 1000000));
    pw.active_fine_tunes = std::min(resident, pw.fine_tunes);
    ASSIGN_OR_RETURN(const Plan plan, MakePlan(model, gpu, pw, o));
    s.config.cost = PlanStepCost(model, gpu, o);
    w.block_tokens = o.block_tokens;
    w.kv_blocks = plan.kv_cache_tokens / o.block_tokens;
    w.max_batch_tokens = o.max_batch_tokens;
    w.max_running_sequences = plan.max_running_sequences;
    w.host_blocks = static_cast<int64_t>(plan.host_cache_mb * kMiB) / plan.tier_slot_bytes;
    w.disk_blocks = static_cast<int64_t>(plan.disk_cache_mb * kMiB) / plan.tier_slot_bytes;
    block_bytes = static_cast<double>(plan.tier_slot_bytes);
    if (pw.fine_tunes > 0) {
      // The plan's delta region holds the active fine-tunes; a cold one is read from disk and
      // copied up.
      w.resident_deltas = plan.active_fine_tunes;
      w.delta_load_s =
          plan.delta_bytes / kDeltaReadBytesPerS + plan.delta_bytes / kHostToDeviceBytesPerS;
    }
    s.source = absl::StrFormat("%s x %d roofline (%s)", gpu.name, o.tensor_parallel, gpu.source);
  }
  ASSIGN_OR_RETURN(w.kv_blocks, IntIn(args, "kv-blocks", w.kv_blocks, 1, 1000000000));
  ASSIGN_OR_RETURN(w.host_blocks, IntIn(args, "host-blocks", w.host_blocks, 0, 1000000000));
  ASSIGN_OR_RETURN(w.disk_blocks, IntIn(args, "disk-blocks", w.disk_blocks, 0, 1000000000));
  ASSIGN_OR_RETURN(const double disk_gbps, NonNegative(args, "disk-read-gbps", 2.0));
  if (disk_gbps <= 0) return absl::InvalidArgumentError("--disk-read-gbps must be above 0");
  w.disk_block_s = block_bytes / (disk_gbps * 1e9);
  if (w.disk_blocks > 0 && block_bytes <= 0) {
    return absl::InvalidArgumentError(
        "--disk-blocks needs the size of a block: this profile has no block_bytes (write it again "
        "with this version's stratactl profile)");
  }
  // Copies between workers: as strata-coordinator's --kv_fetch_weight, over links of this rate
  // (0: no copies; on by default in a real cluster, where loopback gRPC between CPU workers
  // moves about 0.5 GB/s, docs/PERFORMANCE.md).
  ASSIGN_OR_RETURN(const double copy_gbps, NonNegative(args, "kv-copy-gbps", 0));
  if (copy_gbps > 0) {
    if (block_bytes <= 0) {
      return absl::InvalidArgumentError(
          "--kv-copy-gbps needs the size of a block: this profile has no block_bytes (write it "
          "again with this version's stratactl profile)");
    }
    w.kv_copy_block_s = block_bytes / (copy_gbps * 1e9);
  }
  ASSIGN_OR_RETURN(s.config.router.fetch_weight,
                   NonNegative(args, "kv-fetch-weight", s.config.router.fetch_weight));
  if (s.config.router.fetch_weight > 1) {
    return absl::InvalidArgumentError("--kv-fetch-weight must be in [0, 1]");
  }
  ASSIGN_OR_RETURN(w.resident_deltas,
                   IntIn(args, "resident-deltas", w.resident_deltas, 1, 1000000));
  ASSIGN_OR_RETURN(const double load_ms, NonNegative(args, "delta-load-ms", 1e3 * w.delta_load_s));
  w.delta_load_s = load_ms / 1e3;
  const std::string router = args.Get("router").value_or("cost");
  if (router != "cost" && router != "round-robin") {
    return absl::InvalidArgumentError(
        absl::StrCat("--router must be cost or round-robin, not \"", router, "\""));
  }
  s.config.router.round_robin = router == "round-robin";
  // As strata-worker's --inflight_prefill_min_tokens (0: never waits).
  ASSIGN_OR_RETURN(
      w.inflight_prefill_min_tokens,
      IntIn(args, "inflight-prefill-min-tokens", w.inflight_prefill_min_tokens, 0, 1000000000));
  // As strata-coordinator's --decode_weight and --cold_fine_tune_blocks.
  ASSIGN_OR_RETURN(s.config.router.decode_weight,
                   NonNegative(args, "decode-weight", s.config.router.decode_weight));
  ASSIGN_OR_RETURN(
      s.config.router.cold_fine_tune_blocks,
      NonNegative(args, "cold-fine-tune-blocks", s.config.router.cold_fine_tune_blocks));
  return s;
}

std::string PercentilesJson(const SimPercentiles& p) {
  return absl::StrFormat("{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"mean\":%.3f}", p.p50, p.p90,
                         p.p99, p.mean);
}

std::string RunJson(double rate, int workers, const SimResult& r) {
  return absl::StrFormat(
      "{\"rate_per_s\":%g,\"workers\":%d,\"requests\":%d,\"completed\":%d,\"rejected\":%d,"
      "\"duration_s\":%.3f,\"throughput_rps\":%.3f,\"output_tokens_per_s\":%.1f,"
      "\"unfinished\":%d,\"cache_hit_rate\":%.4f,\"preemptions\":%d,\"restored_blocks\":%d,"
      "\"disk_loaded_blocks\":%d,\"copied_blocks\":%d,\"prefill_handoffs\":%d,"
      "\"inflight_prefix_waits\":%d,"
      "\"mean_decode_batch\":%.2f,\"delta_loads\":%d,\"mean_step_deltas\":%.2f,\"ttft_ms\":%s,"
      "\"tpot_ms\":%s,\"e2e_ms\":%s,"
      "\"worker_utilization\":[%s]}",
      rate, workers, r.requests, r.completed, r.rejected, r.duration_s, r.throughput_rps,
      r.output_tokens_per_s, r.unfinished, r.cache_hit_rate, r.preemptions, r.restored_blocks,
      r.disk_loaded_blocks, r.copied_blocks, r.prefill_handoffs, r.inflight_prefix_waits,
      r.mean_decode_batch, r.delta_loads, r.mean_step_deltas, PercentilesJson(r.ttft_ms),
      PercentilesJson(r.tpot_ms), PercentilesJson(r.e2e_ms),
      absl::StrJoin(r.worker_utilization, ",",
                    [](std::string* o, double u) { absl::StrAppendFormat(o, "%.4f", u); }));
}

double MeanUtilization(const SimResult& r) {
  if (r.worker_utilization.empty()) return 0;
  return std::accumulate(r.worker_utilization.begin(), r.worker_utilization.end(), 0.0) /
         static_cast<double>(r.worker_utilization.size());
}

void PrintRun(std::FILE* out, const WorkloadOptions& o, double rate, int workers,
              const SimResult& r) {
  absl::FPrintF(out,
                "simulated  %d worker%s, %s workload: %d requests at %g/s (%d done, %d rejected) "
                "in %.1f s\n",
                workers, workers == 1 ? "" : "s", o.kind, r.requests, rate, r.completed, r.rejected,
                r.duration_s);
  absl::FPrintF(out, "            %9s %9s %9s %9s\n", "p50", "p90", "p99", "mean");
  for (const auto& [name, p] : {std::pair<const char*, SimPercentiles>{"TTFT ms", r.ttft_ms},
                                {"TPOT ms", r.tpot_ms},
                                {"E2E ms", r.e2e_ms}}) {
    absl::FPrintF(out, "%-11s %9.2f %9.2f %9.2f %9.2f\n", name, p.p50, p.p90, p.p99, p.mean);
  }
  absl::FPrintF(
      out,
      "throughput %.2f req/s, %.1f output tok/s; prefix-cache hit rate %.3f; mean "
      "decode batch %.1f; %d preemptions; %d blocks restored from host, %d read from disk, %d "
      "copied from other workers; %d waited for a prefix in flight\n",
      r.throughput_rps, r.output_tokens_per_s, r.cache_hit_rate, r.mean_decode_batch, r.preemptions,
      r.restored_blocks, r.disk_loaded_blocks, r.copied_blocks, r.inflight_prefix_waits);
  if (r.prefill_handoffs > 0) {
    absl::FPrintF(out, "split      %d requests prefilled on a prefill worker, decoded on another\n",
                  r.prefill_handoffs);
  }
  if (o.fine_tunes > 0) {
    absl::FPrintF(
        out, "fine-tunes %d (Zipf %g, %.0f%% base): %d delta loads, %.1f distinct per step\n",
        o.fine_tunes, o.fine_tune_zipf, 100 * o.base_fraction, r.delta_loads, r.mean_step_deltas);
  }
  if (r.unfinished > 0) {
    absl::FPrintF(out, "unfinished %d requests never ran (a simulator fault: please report it)\n",
                  r.unfinished);
  }
  absl::FPrintF(out, "busy       %s\n",
                absl::StrJoin(r.worker_utilization, " ", [](std::string* s, double u) {
                  absl::StrAppendFormat(s, "%.0f%%", 100 * u);
                }));
}

bool MeetsTargets(const SimResult& r, double ttft_p99_ms, double tpot_p99_ms) {
  if (r.rejected > 0 || r.unfinished > 0 || r.completed == 0) return false;
  if (ttft_p99_ms > 0 && r.ttft_ms.p99 > ttft_p99_ms) return false;
  if (tpot_p99_ms > 0 && r.tpot_ms.p99 > tpot_p99_ms) return false;
  return true;
}

}  // namespace

std::string CurveSvg(const std::vector<CurvePoint>& points, const std::string& title_text) {
  const std::string title = absl::StrReplaceAll(
      title_text, {{"&", "&amp;"}, {"<", "&lt;"}, {">", "&gt;"}, {"\"", "&quot;"}});
  // Two panels side by side: p99 TTFT and p99 TPOT against the offered rate, linear axes from 0.
  constexpr double kW = 360, kH = 240, kLeft = 60, kTop = 40, kGap = 90;
  double max_rate = 0, max_ttft = 0, max_tpot = 0;
  for (const CurvePoint& p : points) {
    max_rate = std::max(max_rate, p.rate);
    max_ttft = std::max(max_ttft, p.result.ttft_ms.p99);
    max_tpot = std::max(max_tpot, p.result.tpot_ms.p99);
  }
  auto nice = [](double v) {
    if (v <= 0) return 1.0;
    const double e = std::pow(10.0, std::floor(std::log10(v)));
    for (double m : {1.0, 2.0, 5.0, 10.0}) {
      if (v <= m * e) return m * e;
    }
    return 10 * e;
  };
  max_rate = nice(max_rate);
  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"%.0f\" y=\"20\" "
      "font-size=\"14\">%s</text>\n",
      kLeft + 2 * kW + kGap + 20, kTop + kH + 50, kLeft, title);
  const struct {
    const char* label;
    double max;
    bool ttft;
  } panels[] = {{"p99 TTFT (ms)", nice(max_ttft), true}, {"p99 TPOT (ms)", nice(max_tpot), false}};
  for (int i = 0; i < 2; ++i) {
    const double x0 = kLeft + i * (kW + kGap);
    const double ymax = panels[i].max;
    absl::StrAppendFormat(&svg,
                          "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" "
                          "fill=\"none\" stroke=\"#444\"/>\n",
                          x0, kTop, kW, kH);
    for (int t = 0; t <= 4; ++t) {
      const double y = kTop + kH - kH * t / 4;
      const double x = x0 + kW * t / 4;
      absl::StrAppendFormat(&svg,
                            "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"end\">%g</text>\n"
                            "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">%g</text>\n",
                            x0 - 6, y + 4, ymax * t / 4, x, kTop + kH + 16, max_rate * t / 4);
    }
    absl::StrAppendFormat(&svg,
                          "<text x=\"%.0f\" y=\"%.0f\">%s</text>\n"
                          "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">offered "
                          "requests/s</text>\n",
                          x0, kTop - 6, panels[i].label, x0 + kW / 2, kTop + kH + 34);
    std::string path;
    for (const CurvePoint& p : points) {
      const double v = panels[i].ttft ? p.result.ttft_ms.p99 : p.result.tpot_ms.p99;
      const double x = x0 + kW * p.rate / max_rate;
      const double y = kTop + kH - kH * std::min(1.0, v / ymax);
      absl::StrAppendFormat(&path, "%s%.1f,%.1f", path.empty() ? "" : " ", x, y);
      absl::StrAppendFormat(&svg, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"#1f77b4\"/>\n", x,
                            y);
    }
    absl::StrAppendFormat(&svg,
                          "<polyline points=\"%s\" fill=\"none\" stroke=\"#1f77b4\" "
                          "stroke-width=\"2\"/>\n",
                          path);
  }
  svg += "</svg>\n";
  return svg;
}

absl::StatusOr<Args> ParseSimulateArgs(const std::vector<std::string>& argv) {
  absl::flat_hash_set<std::string> flags = PlanMachineFlags();
  flags.insert({"profile",         "kv-blocks",
                "host-blocks",     "disk-blocks",
                "disk-read-gbps",  "workers",
                "router",          "workload",
                "requests",        "rate",
                "rates",           "prompt-tokens",
                "output-tokens",   "shared-prefix-tokens",
                "shared-fraction", "shared-prefixes",
                "turns",           "turn-tokens",
                "think-time-ms",   "seed",
                "fine-tunes",      "fine-tune-zipf",
                "base-fraction",   "resident-deltas",
                "decode-weight",   "cold-fine-tune-blocks",
                "delta-load-ms",   "ttft-p99-ms",
                "tpot-p99-ms",     "svg"});
  flags.insert({"inflight-prefill-min-tokens", "replies-in-history", "kv-copy-gbps",
                "kv-fetch-weight", "prefill-workers", "disaggregate-min-uncached-tokens",
                "disaggregate-max-prefill-queue-tokens"});
  return Args::Parse(argv, {"json", "find-workers"}, flags);
}

absl::Status SimulateCommand(const Args& args, std::FILE* out) {
  ASSIGN_OR_RETURN(WorkloadOptions wo, WorkloadFromArgs(args));
  ASSIGN_OR_RETURN(const std::vector<double> rates, Rates(args));
  wo.rate_per_s = rates[0];
  ASSIGN_OR_RETURN(const std::vector<Conversation> first, MakeWorkload(wo));
  ASSIGN_OR_RETURN(Setup setup, SetupFromArgs(args, wo, first));
  ASSIGN_OR_RETURN(const int64_t workers, IntIn(args, "workers", 1, 1, kMaxWorkers));
  setup.config.workers = static_cast<int>(workers);
  // Disaggregated: the first --prefill-workers of them take prompts only.
  // (With --find-workers, the decode workers are what is sized, beside this many prefill ones.)
  ASSIGN_OR_RETURN(
      const int64_t prefill_workers,
      IntIn(args, "prefill-workers", 0, 0,
            args.Has("find-workers") ? kMaxWorkers - 1 : std::max<int64_t>(0, workers - 1)));
  setup.config.prefill_workers = static_cast<int>(prefill_workers);
  ASSIGN_OR_RETURN(setup.config.disaggregate_min_uncached_tokens,
                   IntIn(args, "disaggregate-min-uncached-tokens",
                         setup.config.disaggregate_min_uncached_tokens, 0, 1000000000));
  ASSIGN_OR_RETURN(setup.config.disaggregate_max_prefill_queue_tokens,
                   IntIn(args, "disaggregate-max-prefill-queue-tokens",
                         setup.config.disaggregate_max_prefill_queue_tokens, 0, 1000000000));
  ASSIGN_OR_RETURN(const double ttft_target, NonNegative(args, "ttft-p99-ms", 0));
  ASSIGN_OR_RETURN(const double tpot_target, NonNegative(args, "tpot-p99-ms", 0));
  const bool json = args.Has("json");
  const SimWorkerConfig& w = setup.config.worker;
  if (!json) {
    absl::FPrintF(out, "costs      %s\n", setup.source);
    absl::FPrintF(out,
                  "worker     KV cache %d blocks of %d tokens, host tier %d blocks, disk tier %d "
                  "blocks (%.2f ms a read), batch up to %d sequences and %d tokens a step\n",
                  w.kv_blocks, w.block_tokens, w.host_blocks, w.disk_blocks, 1e3 * w.disk_block_s,
                  w.max_running_sequences, w.max_batch_tokens);
    if (wo.fine_tunes > 0) {
      absl::FPrintF(out,
                    "deltas     %d resident per worker, a cold one loads in %.1f ms, each distinct "
                    "one in a step adds %.2f ms (reads) / %.2f ms + %.1f us a token (compute)%s\n",
                    w.resident_deltas, 1e3 * w.delta_load_s, 1e3 * setup.config.cost.delta_s,
                    1e3 * setup.config.cost.delta_compute_s, 1e6 * setup.config.cost.delta_token_s,
                    args.Has("profile") && setup.config.cost.delta_compute_s == 0 &&
                            setup.config.cost.delta_token_s == 0
                        ? " (a profile measures it only with --delta)"
                        : "");
    }
  }

  if (args.Has("find-workers")) {
    if (rates.size() != 1) return absl::InvalidArgumentError("--find-workers takes one --rate");
    if (ttft_target == 0 && tpot_target == 0) {
      return absl::InvalidArgumentError(
          "--find-workers needs --ttft-p99-ms and/or --tpot-p99-ms to meet");
    }
    if (args.Has("workers")) {
      return absl::InvalidArgumentError("give --workers or --find-workers, not both");
    }
    // Double until the targets hold, then bisect: latency falls as workers are added. More
    // workers than requests change nothing, and the simulator holds 50 million blocks. With
    // --prefill-workers P, the count searched is the decode workers beside those P.
    const int fixed = setup.config.prefill_workers;
    const int most = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>({kMaxWorkers, wo.num_requests,
                              static_cast<int64_t>(5e7) / std::max<int64_t>(1, w.kv_blocks)}) -
               fixed));
    int lo = 0, hi = 1;
    SimResult best;
    for (;;) {
      setup.config.workers = fixed + hi;
      ASSIGN_OR_RETURN(const SimResult r, Simulate(first, setup.config));
      if (MeetsTargets(r, ttft_target, tpot_target)) {
        best = r;
        break;
      }
      if (r.rejected > 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            r.rejected, " requests are longer than a worker's KV cache (",
            w.kv_blocks * w.block_tokens, " tokens): no number of workers serves them"));
      }
      lo = hi;
      if (hi == most) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "even %d workers miss the targets at %g requests/s (p99 TTFT %.1f ms, TPOT %.2f ms): "
            "a single request alone may already miss them",
            most, rates[0], r.ttft_ms.p99, r.tpot_ms.p99));
      }
      hi = std::min(most, 2 * hi);
    }
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      setup.config.workers = fixed + mid;
      ASSIGN_OR_RETURN(const SimResult r, Simulate(first, setup.config));
      if (MeetsTargets(r, ttft_target, tpot_target)) {
        hi = mid;
        best = r;
      } else {
        lo = mid;
      }
    }
    if (json) {
      absl::FPrintF(out,
                    "{\"source\":%s,\"workers\":%d,\"prefill_workers\":%d,"
                    "\"ttft_p99_ms_target\":%g,\"tpot_p99_ms_target\":%g,\"run\":%s}\n",
                    JsonQuote(setup.source), fixed + hi, fixed, ttft_target, tpot_target,
                    RunJson(rates[0], fixed + hi, best));
      return absl::OkStatus();
    }
    std::vector<std::string> targets;
    if (ttft_target > 0) targets.push_back(absl::StrFormat("p99 TTFT <= %g ms", ttft_target));
    if (tpot_target > 0) targets.push_back(absl::StrFormat("p99 TPOT <= %g ms", tpot_target));
    const std::string kind =
        fixed > 0 ? absl::StrCat(" decode (beside ", fixed, " prefill workers)") : "";
    absl::FPrintF(out, "workers    %d%s meet %s at %g requests/s%s\n", hi, kind,
                  absl::StrJoin(targets, " and "), rates[0],
                  hi > 1 ? absl::StrCat(" (", hi - 1, " do not)") : "");
    PrintRun(out, wo, rates[0], fixed + hi, best);
    return absl::OkStatus();
  }

  std::vector<CurvePoint> points;
  for (double rate : rates) {
    wo.rate_per_s = rate;
    ASSIGN_OR_RETURN(const std::vector<Conversation> workload, MakeWorkload(wo));
    ASSIGN_OR_RETURN(SimResult r, Simulate(workload, setup.config));
    points.push_back({rate, std::move(r)});
  }
  if (args.Has("svg")) {
    const std::string title =
        absl::StrFormat("%d worker%s, %s workload, %d requests per rate", setup.config.workers,
                        setup.config.workers == 1 ? "" : "s", wo.kind, wo.num_requests);
    const std::string path = *args.Get("svg");
    std::FILE* f = std::fopen(path.c_str(), "w");
    if (f == nullptr) return absl::InvalidArgumentError(absl::StrCat("--svg: cannot write ", path));
    const std::string svg = CurveSvg(points, title);
    const bool ok = std::fwrite(svg.data(), 1, svg.size(), f) == svg.size();
    if (std::fclose(f) != 0 || !ok) {
      return absl::InternalError(absl::StrCat("--svg: writing ", path, " failed"));
    }
  }
  if (json) {
    std::vector<std::string> runs;
    for (const CurvePoint& p : points)
      runs.push_back(RunJson(p.rate, setup.config.workers, p.result));
    absl::FPrintF(out, "{\"source\":%s,\"workload\":%s,\"runs\":[%s]}\n", JsonQuote(setup.source),
                  JsonQuote(wo.kind), absl::StrJoin(runs, ","));
    return absl::OkStatus();
  }
  if (points.size() == 1) {
    PrintRun(out, wo, points[0].rate, setup.config.workers, points[0].result);
    if (ttft_target > 0 || tpot_target > 0) {
      absl::FPrintF(out, "targets    %s\n",
                    MeetsTargets(points[0].result, ttft_target, tpot_target) ? "met" : "missed");
    }
    return absl::OkStatus();
  }
  absl::FPrintF(out, "%d worker%s, %s workload, %d requests per rate\n", setup.config.workers,
                setup.config.workers == 1 ? "" : "s", wo.kind, wo.num_requests);
  absl::FPrintF(out, "%9s %9s %10s %9s %9s %9s %9s %6s %6s%s\n", "rate/s", "done/s", "out tok/s",
                "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "busy", "hit",
                ttft_target > 0 || tpot_target > 0 ? "  targets" : "");
  for (const CurvePoint& p : points) {
    const SimResult& r = p.result;
    absl::FPrintF(out, "%9g %9.2f %10.1f %9.1f %9.1f %9.2f %9.2f %5.0f%% %6.3f%s\n", p.rate,
                  r.throughput_rps, r.output_tokens_per_s, r.ttft_ms.p50, r.ttft_ms.p99,
                  r.tpot_ms.p50, r.tpot_ms.p99, 100 * MeanUtilization(r), r.cache_hit_rate,
                  ttft_target > 0 || tpot_target > 0
                      ? (MeetsTargets(r, ttft_target, tpot_target) ? "  met" : "  missed")
                      : "");
  }
  return absl::OkStatus();
}

}  // namespace strata

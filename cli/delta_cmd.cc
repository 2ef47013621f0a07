#include "cli/delta_cmd.h"

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/json.h"
#include "common/mapped_file.h"
#include "common/status_macros.h"
#include "tokenizer/tokenizer.h"
#include "worker/model/config.h"
#include "worker/model/delta.h"
#include "worker/model/delta_calibration.h"
#include "worker/model/lora.h"
#include "worker/model/weights.h"

namespace strata {

absl::Status DeltaCompressCommand(const Args& args, std::FILE* out) {
  ASSIGN_OR_RETURN(std::string base, args.GetRequired("base"));
  ASSIGN_OR_RETURN(std::string fine_tune, args.GetRequired("fine-tune"));
  ASSIGN_OR_RETURN(std::string out_path, args.GetRequired("out"));
  DeltaCompressOptions options;
  ASSIGN_OR_RETURN(int64_t bits, args.GetInt("bits", 4));
  if (bits != 2 && bits != 4 && bits != 8) {
    return absl::InvalidArgumentError("--bits must be 2, 4 or 8");
  }
  options.bits = static_cast<int>(bits);
  const std::string sparsity = args.Get("sparsity").value_or("none");
  if (sparsity != "2:4" && sparsity != "none") {
    return absl::InvalidArgumentError("--sparsity must be 2:4 or none");
  }
  options.sparse_2_4 = sparsity == "2:4";
  options.base_model_name = args.Get("base-name").value_or(base);
  ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  if (threads < 0 || threads > 1024)
    return absl::InvalidArgumentError("--threads must be in [0, 1024]");
  options.threads = static_cast<int>(threads);
  const auto start = std::chrono::steady_clock::now();
  int64_t calibration_tokens = 0;
  if (std::optional<std::string> calibration = args.Get("calibration")) {
    if (!options.sparse_2_4) {
      return absl::InvalidArgumentError(
          "--calibration only changes which values 2:4 sparsity keeps: add --sparsity 2:4");
    }
    // Column importance from the base's activations on this text (docs/FINE_TUNES.md).
    ASSIGN_OR_RETURN(int64_t most, args.GetInt("calibration-tokens", 32768));
    ASSIGN_OR_RETURN(int64_t context, args.GetInt("calibration-context", 512));
    if (most <= 0) return absl::InvalidArgumentError("--calibration-tokens must be positive");
    ASSIGN_OR_RETURN(std::string text, ReadFileToString(*calibration),
                     _.Prepend("--calibration: "));
    ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::FromModelDir(base));
    ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                     tokenizer->Encode(text, /*add_special_tokens=*/true));
    if (static_cast<int64_t>(ids.size()) > most) ids.resize(most);
    ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(base));
    ASSIGN_OR_RETURN(std::unique_ptr<ModelWeights> weights, LoadModelWeights(base, config, 0, 1));
    CalibrationOptions co;
    co.context = context;
    co.threads = options.threads;
    ASSIGN_OR_RETURN(options.column_importance, CalibrateColumnImportance(*weights, ids, co),
                     _.Prepend("--calibration: "));
    calibration_tokens = static_cast<int64_t>(ids.size());
  }
  ASSIGN_OR_RETURN(DeltaCompressReport report, CompressDelta(base, fine_tune, out_path, options));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double ratio = report.delta_bytes > 0
                           ? static_cast<double>(report.fine_tune_bytes) / report.delta_bytes
                           : 0.0;
  if (args.Has("json")) {
    std::vector<std::string> tensors;
    for (const auto& t : report.tensors) {
      tensors.push_back(absl::StrFormat(
          "{\"name\":%s,\"rows\":%d,\"cols\":%d,\"relative_error\":%.6f,\"bytes\":%d}",
          JsonQuote(t.name), t.rows, t.cols, t.relative_error, t.packed_bytes));
    }
    std::fprintf(
        out,
        "{\"out\":%s,\"bits\":%d,\"sparsity\":%s,\"base_fingerprint\":%s,"
        "\"fine_tune_bytes\":%lld,\"delta_bytes\":%lld,\"compression\":%.3f,"
        "\"unchanged_tensors\":%lld,\"calibration_tokens\":%lld,\"calibrated_tensors\":%lld,"
        "\"seconds\":%.3f,\"tensors\":[%s]}\n",
        JsonQuote(out_path).c_str(), options.bits, JsonQuote(sparsity).c_str(),
        JsonQuote(report.base_fingerprint).c_str(), static_cast<long long>(report.fine_tune_bytes),
        static_cast<long long>(report.delta_bytes), ratio,
        static_cast<long long>(report.num_unchanged), static_cast<long long>(calibration_tokens),
        static_cast<long long>(report.num_calibrated), seconds,
        absl::StrJoin(tensors, ",").c_str());
    return absl::OkStatus();
  }
  std::fprintf(out, "%-48s %12s %10s %10s\n", "tensor", "shape", "rel.error", "bytes");
  for (const auto& t : report.tensors) {
    const std::string shape = t.cols > 0 ? absl::StrCat(t.rows, "x", t.cols) : absl::StrCat(t.rows);
    std::fprintf(out, "%-48s %12s %10.4f %10lld\n", t.name.c_str(), shape.c_str(), t.relative_error,
                 static_cast<long long>(t.packed_bytes));
  }
  std::fprintf(out,
               "wrote %s: %d-bit, sparsity %s, %lld tensors (%lld unchanged left out), "
               "%.2f MB from %.2f MB of fine-tune weights (%.2fx), base fingerprint %s, %.1f s\n",
               out_path.c_str(), options.bits, sparsity.c_str(),
               static_cast<long long>(report.tensors.size()),
               static_cast<long long>(report.num_unchanged), report.delta_bytes / 1e6,
               report.fine_tune_bytes / 1e6, ratio, report.base_fingerprint.c_str(), seconds);
  if (calibration_tokens > 0) {
    std::fprintf(out, "calibrated on %lld tokens: %lld matrices packed by column importance\n",
                 static_cast<long long>(calibration_tokens),
                 static_cast<long long>(report.num_calibrated));
  }
  return absl::OkStatus();
}

namespace {

// delta inspect of a LoRA adapter's directory: its shapes are checked against --base.
absl::Status LoraInspect(const std::string& path, const Args& args, std::FILE* out) {
  std::optional<std::string> base_dir = args.Get("base");
  if (!base_dir.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is a LoRA adapter: give --base DIR, the model it adapts"));
  }
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(*base_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<ModelWeights> base, LoadModelWeights(*base_dir, config, 0, 1));
  ASSIGN_OR_RETURN(LoraAdapterInfo info, ReadLoraAdapterInfo(path, config, LoraFactorType(*base)));
  ASSIGN_OR_RETURN(std::unique_ptr<DeltaWeights> d, LoadLoraAdapter(path, *base));
  if (args.Has("json")) {
    std::fprintf(out,
                 "{\"path\":%s,\"kind\":\"lora\",\"base_model\":%s,\"modules\":%lld,"
                 "\"max_rank\":%lld,\"revision\":\"%s\",\"resident_bytes\":%lld}\n",
                 JsonQuote(path).c_str(), JsonQuote(info.base_model_name_or_path).c_str(),
                 static_cast<long long>(info.num_modules), static_cast<long long>(info.max_rank),
                 info.revision.c_str(), static_cast<long long>(d->resident_bytes));
    return absl::OkStatus();
  }
  std::fprintf(
      out,
      "%s\n  kind              LoRA adapter (PEFT)\n  base model        %s\n  modules    "
      "       %lld adapted projections, rank up to %lld\n  revision          %s\n  "
      "in memory         %.2f MB (%s)\n  loads             yes, over %s\n",
      path.c_str(),
      info.base_model_name_or_path.empty() ? "(not named)" : info.base_model_name_or_path.c_str(),
      static_cast<long long>(info.num_modules), static_cast<long long>(info.max_rank),
      info.revision.c_str(), d->resident_bytes / 1e6,
      std::string(DTypeName(LoraFactorType(*base))).c_str(), base_dir->c_str());
  return absl::OkStatus();
}

}  // namespace

absl::Status DeltaInspectCommand(const Args& args, std::FILE* out) {
  if (args.positional().size() != 1) {
    return absl::InvalidArgumentError("delta inspect takes one delta file");
  }
  const std::string path = args.positional()[0];
  if (IsLoraAdapter(path)) return LoraInspect(path, args, out);
  ASSIGN_OR_RETURN(DeltaFileInfo info, ReadDeltaFileInfo(path));
  std::string loads = "not checked (give --base DIR)";
  int64_t resident = 0;
  if (std::optional<std::string> base_dir = args.Get("base")) {
    ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(*base_dir));
    ASSIGN_OR_RETURN(std::unique_ptr<ModelWeights> base, LoadModelWeights(*base_dir, config, 0, 1));
    absl::StatusOr<std::unique_ptr<DeltaWeights>> d =
        LoadDelta(path, *base, BaseFingerprint(*base->files));
    if (!d.ok()) return d.status();
    loads = absl::StrCat("yes, over ", *base_dir);
    resident = (*d)->resident_bytes;
  }
  if (args.Has("json")) {
    std::fprintf(out,
                 "{\"path\":%s,\"base_model\":%s,\"base_fingerprint\":%s,\"bits\":%d,"
                 "\"sparsity\":\"%s\",\"tensors\":%lld,\"data_bytes\":%lld,"
                 "\"resident_bytes\":%lld}\n",
                 JsonQuote(path).c_str(), JsonQuote(info.base_model).c_str(),
                 JsonQuote(info.base_fingerprint).c_str(), info.bits,
                 info.sparse_2_4 ? "2:4" : "none", static_cast<long long>(info.num_tensors),
                 static_cast<long long>(info.data_bytes), static_cast<long long>(resident));
    return absl::OkStatus();
  }
  std::fprintf(out,
               "%s\n  base model        %s\n  base fingerprint  %s\n  compression       %d-bit, "
               "sparsity %s\n  tensors           %lld (%.2f MB)\n  loads             %s\n",
               path.c_str(), info.base_model.c_str(), info.base_fingerprint.c_str(), info.bits,
               info.sparse_2_4 ? "2:4" : "none", static_cast<long long>(info.num_tensors),
               info.data_bytes / 1e6, loads.c_str());
  return absl::OkStatus();
}

}  // namespace strata

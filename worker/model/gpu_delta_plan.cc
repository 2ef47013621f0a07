#include "worker/model/gpu_delta_plan.h"

#include <algorithm>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace strata {
namespace {

constexpr int64_t kAlign = 256;

int64_t AlignUp(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

int64_t DeltaResidency::FindGap(int64_t bytes) const {
  int64_t at = 0;
  for (const auto& [offset, size] : by_offset_) {
    if (offset - at >= bytes) return at;
    at = offset + size;
  }
  return capacity_ - at >= bytes ? at : -1;
}

absl::StatusOr<DeltaResidency::Placement> DeltaResidency::Place(uint64_t serial, int64_t bytes,
                                                                int64_t step) {
  if (auto it = entries_.find(serial); it != entries_.end()) {
    it->second.last_step = step;
    return Placement{it->second.offset, false};
  }
  const int64_t need = AlignUp(std::max<int64_t>(bytes, 1));
  if (need > capacity_) {
    return absl::ResourceExhaustedError(absl::StrCat("gpu runner: a fine-tune delta of ", bytes,
                                                     " bytes exceeds the device delta region of ",
                                                     capacity_, " bytes"));
  }
  int64_t at = FindGap(need);
  while (at < 0) {
    // Evict the least recently used entry that this step does not use.
    auto victim = entries_.end();
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->second.last_step == step) continue;
      if (victim == entries_.end() || it->second.last_step < victim->second.last_step) victim = it;
    }
    if (victim == entries_.end()) {
      return absl::ResourceExhaustedError(absl::StrCat("gpu runner: the device delta region (",
                                                       capacity_,
                                                       " bytes) cannot hold every fine-tune "
                                                       "of this step; a delta of ",
                                                       bytes, " bytes does not fit"));
    }
    by_offset_.erase(victim->second.offset);
    used_ -= AlignUp(victim->second.bytes);
    entries_.erase(victim);
    ++evictions_;
    at = FindGap(need);
  }
  entries_[serial] = Entry{at, need, step};
  by_offset_[at] = need;
  used_ += need;
  ++uploads_;
  return Placement{at, true};
}

std::pair<int64_t, int64_t> DeltaStepPlan::LogitRange(const Segment& s, int64_t offset,
                                                      int64_t count) {
  const auto begin = std::lower_bound(s.logit_rows.begin(), s.logit_rows.end(), offset);
  const auto end = std::lower_bound(begin, s.logit_rows.end(), offset + count);
  return {begin - s.logit_rows.begin(), end - begin};
}

DeltaStepPlan PlanDeltaStep(absl::Span<const int32_t> tokens, absl::Span<const int32_t> token_seq,
                            absl::Span<const DeltaWeights* const> seq_deltas,
                            absl::Span<const int32_t> logit_tokens, int64_t logit_chunk) {
  DeltaStepPlan plan;
  if (seq_deltas.empty()) return plan;
  const int64_t n = static_cast<int64_t>(tokens.size());
  std::vector<int32_t> token_segment(n, -1);
  std::vector<std::vector<int32_t>> rows;
  for (int64_t t = 0; t < n; ++t) {
    const int32_t seq = token_seq[t];
    const DeltaWeights* d =
        seq >= 0 && seq < static_cast<int32_t>(seq_deltas.size()) ? seq_deltas[seq] : nullptr;
    if (d == nullptr) continue;
    int32_t s = 0;
    while (s < static_cast<int32_t>(plan.segments.size()) && plan.segments[s].delta != d) ++s;
    if (s == static_cast<int32_t>(plan.segments.size())) {
      plan.segments.emplace_back().delta = d;
      rows.emplace_back();
    }
    token_segment[t] = s;
    rows[s].push_back(static_cast<int32_t>(t));
  }
  for (size_t i = 0; i < logit_tokens.size(); ++i) {
    const int32_t t = logit_tokens[i];
    if (t >= 0 && t < n && token_segment[t] >= 0) {
      plan.segments[token_segment[t]].logit_rows.push_back(static_cast<int32_t>(i));
    }
  }
  if (plan.segments.empty()) return plan;
  plan.token_segment = std::move(token_segment);
  for (size_t s = 0; s < plan.segments.size(); ++s) {
    DeltaStepPlan::Segment& seg = plan.segments[s];
    seg.num_rows = static_cast<int64_t>(rows[s].size());
    seg.rows_at = static_cast<int64_t>(plan.indices.size());
    plan.indices.insert(plan.indices.end(), rows[s].begin(), rows[s].end());
    seg.ids_at = static_cast<int64_t>(plan.indices.size());
    for (int32_t t : rows[s]) plan.indices.push_back(tokens[t]);
    seg.logits_at = static_cast<int64_t>(plan.indices.size());
    for (int32_t i : seg.logit_rows) {
      plan.indices.push_back(static_cast<int32_t>(i % logit_chunk));
    }
    for (int32_t t : rows[s]) {
      if (!seg.runs.empty() && seg.runs.back().second == t) {
        ++seg.runs.back().second;
      } else {
        seg.runs.emplace_back(t, t + 1);
      }
    }
  }
  return plan;
}

}  // namespace strata

#include "worker/model/weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "common/status_macros.h"

namespace strata {
namespace {

class Loader {
 public:
  Loader(const SafetensorsModel& files, const ModelConfig& c) : files_(files), c_(c) {}

  // A whole [rows, cols] matrix, or the rows [row_begin, row_begin + row_count) of it.
  absl::StatusOr<Matrix> Rows(const std::string& name, int64_t rows, int64_t cols,
                              int64_t row_begin, int64_t row_count) const {
    ASSIGN_OR_RETURN(const TensorView* t, Get(name, {rows, cols}));
    Matrix m;
    m.dtype = t->dtype;
    m.rows = row_count;
    m.cols = cols;
    m.data = t->data.data() + row_begin * cols * DTypeBytes(t->dtype);
    return m;
  }

  // Columns [col_begin, col_begin + col_count) of a [rows, cols] matrix (copied unless whole).
  absl::StatusOr<Matrix> Cols(const std::string& name, int64_t rows, int64_t cols,
                              int64_t col_begin, int64_t col_count) const {
    ASSIGN_OR_RETURN(const TensorView* t, Get(name, {rows, cols}));
    Matrix m;
    m.dtype = t->dtype;
    m.rows = rows;
    m.cols = col_count;
    if (col_count == cols) {
      m.data = t->data.data();
      return m;
    }
    const int64_t eb = DTypeBytes(t->dtype);
    m.owned.resize(static_cast<size_t>(rows * col_count * eb));
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(m.owned.data() + r * col_count * eb, t->data.data() + (r * cols + col_begin) * eb,
                  static_cast<size_t>(col_count * eb));
    }
    m.data = m.owned.data();
    return m;
  }

  // A vector (or a slice of one) as f32.
  absl::StatusOr<std::vector<float>> Vector(const std::string& name, int64_t size, int64_t begin,
                                            int64_t count) const {
    ASSIGN_OR_RETURN(const TensorView* t, Get(name, {size}));
    std::vector<float> out(static_cast<size_t>(count));
    const uint8_t* p = t->data.data();
    for (int64_t i = 0; i < count; ++i) {
      const int64_t j = begin + i;
      switch (t->dtype) {
        case DType::kF32:
          std::memcpy(&out[i], p + j * 4, 4);
          break;
        case DType::kBF16: {
          uint16_t h;
          std::memcpy(&h, p + j * 2, 2);
          out[i] = Bf16ToFloat(h);
          break;
        }
        default: {
          uint16_t h;
          std::memcpy(&h, p + j * 2, 2);
          out[i] = F16ToFloat(h);
          break;
        }
      }
    }
    return out;
  }

  bool Has(const std::string& name) const { return files_.Find(name) != nullptr; }

 private:
  absl::StatusOr<const TensorView*> Get(const std::string& name,
                                        const std::vector<int64_t>& shape) const {
    const TensorView* t = files_.Find(name);
    if (t == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(files_.dir(), ": missing tensor ", name,
                                                     " that ", c_.architecture_name, " needs"));
    }
    if (t->shape != shape) {
      return absl::InvalidArgumentError(
          absl::StrCat(*t->file, ": tensor ", name, " has shape [", absl::StrJoin(t->shape, ", "),
                       "], config.json implies [", absl::StrJoin(shape, ", "), "]"));
    }
    if (t->dtype != DType::kF32 && t->dtype != DType::kBF16 && t->dtype != DType::kF16) {
      return absl::InvalidArgumentError(absl::StrCat(*t->file, ": tensor ", name, " has dtype ",
                                                     DTypeName(t->dtype),
                                                     " (supported: F32, BF16, F16)"));
    }
    return t;
  }

  const SafetensorsModel& files_;
  const ModelConfig& c_;
};

}  // namespace

absl::Status CheckTensorParallelSplit(const ModelConfig& c, int world) {
  auto bad = [&](absl::string_view field, int64_t value) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: ", field, " (", value,
                     ") is not divisible by the tensor-parallel size ", world));
  };
  if (c.num_heads % world) return bad("num_attention_heads", c.num_heads);
  if (c.num_kv_heads % world) return bad("num_key_value_heads", c.num_kv_heads);
  if (c.intermediate_size % world) return bad("intermediate_size", c.intermediate_size);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ModelWeights>> LoadModelWeights(const std::string& dir,
                                                               const ModelConfig& c, int rank,
                                                               int world) {
  if (world < 1 || rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " of ", world));
  }
  RETURN_IF_ERROR(CheckTensorParallelSplit(c, world));
  ASSIGN_OR_RETURN(SafetensorsModel files, SafetensorsModel::Open(dir));
  auto w = std::make_unique<ModelWeights>();
  w->files = std::make_shared<const SafetensorsModel>(std::move(files));
  w->config = c;
  w->rank = rank;
  w->world_size = world;
  w->num_heads = c.num_heads / world;
  w->num_kv_heads = c.num_kv_heads / world;
  w->intermediate_size = c.intermediate_size / world;
  const Loader load(*w->files, c);
  const int64_t H = c.hidden_size, D = c.head_dim;
  const int64_t q_rows = w->num_heads * D, kv_rows = w->num_kv_heads * D;
  const int64_t I = w->intermediate_size;

  ASSIGN_OR_RETURN(w->embed,
                   load.Rows("model.embed_tokens.weight", c.vocab_size, H, 0, c.vocab_size));
  const int64_t vocab_share = (c.vocab_size + world - 1) / world;
  w->vocab_begin = std::min<int64_t>(c.vocab_size, rank * vocab_share);
  const int64_t vocab_rows =
      std::min<int64_t>(c.vocab_size, w->vocab_begin + vocab_share) - w->vocab_begin;
  const std::string head = (c.tie_word_embeddings && !load.Has("lm_head.weight"))
                               ? "model.embed_tokens.weight"
                               : "lm_head.weight";
  ASSIGN_OR_RETURN(w->lm_head, load.Rows(head, c.vocab_size, H, w->vocab_begin, vocab_rows));
  ASSIGN_OR_RETURN(w->final_norm, load.Vector("model.norm.weight", H, 0, H));

  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LayerWeights L;
    ASSIGN_OR_RETURN(L.q,
                     load.Rows(p + "self_attn.q_proj.weight", c.q_dim(), H, rank * q_rows, q_rows));
    ASSIGN_OR_RETURN(
        L.k, load.Rows(p + "self_attn.k_proj.weight", c.kv_dim(), H, rank * kv_rows, kv_rows));
    ASSIGN_OR_RETURN(
        L.v, load.Rows(p + "self_attn.v_proj.weight", c.kv_dim(), H, rank * kv_rows, kv_rows));
    ASSIGN_OR_RETURN(L.o,
                     load.Cols(p + "self_attn.o_proj.weight", H, c.q_dim(), rank * q_rows, q_rows));
    if (c.qkv_bias) {
      ASSIGN_OR_RETURN(L.q_bias,
                       load.Vector(p + "self_attn.q_proj.bias", c.q_dim(), rank * q_rows, q_rows));
      ASSIGN_OR_RETURN(
          L.k_bias, load.Vector(p + "self_attn.k_proj.bias", c.kv_dim(), rank * kv_rows, kv_rows));
      ASSIGN_OR_RETURN(
          L.v_bias, load.Vector(p + "self_attn.v_proj.bias", c.kv_dim(), rank * kv_rows, kv_rows));
    }
    if (c.o_bias && rank == 0) {
      ASSIGN_OR_RETURN(L.o_bias, load.Vector(p + "self_attn.o_proj.bias", H, 0, H));
    }
    if (c.qk_norm) {
      ASSIGN_OR_RETURN(L.q_norm, load.Vector(p + "self_attn.q_norm.weight", D, 0, D));
      ASSIGN_OR_RETURN(L.k_norm, load.Vector(p + "self_attn.k_norm.weight", D, 0, D));
    }
    if (c.mlp_bias) {
      return absl::InvalidArgumentError("config.json: mlp_bias is not supported");
    }
    ASSIGN_OR_RETURN(L.gate,
                     load.Rows(p + "mlp.gate_proj.weight", c.intermediate_size, H, rank * I, I));
    ASSIGN_OR_RETURN(L.up,
                     load.Rows(p + "mlp.up_proj.weight", c.intermediate_size, H, rank * I, I));
    ASSIGN_OR_RETURN(L.down,
                     load.Cols(p + "mlp.down_proj.weight", H, c.intermediate_size, rank * I, I));
    ASSIGN_OR_RETURN(L.input_norm, load.Vector(p + "input_layernorm.weight", H, 0, H));
    ASSIGN_OR_RETURN(L.post_attention_norm,
                     load.Vector(p + "post_attention_layernorm.weight", H, 0, H));
    w->layers.push_back(std::move(L));
  }
  return w;
}

namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A normal draw with standard deviation 0.02 that depends only on (seed, tensor, index), so that a
// rank draws its slice of a tensor without drawing the rest (Box-Muller on one 64-bit hash).
float RandomWeight(uint64_t seed, uint64_t tensor, uint64_t index) {
  const uint64_t h = SplitMix64(SplitMix64(seed ^ (tensor << 48)) ^ index);
  const float u1 = (static_cast<float>(h >> 40) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1)
  const float u2 = static_cast<float>(h & 0xffffff) * (1.0f / 16777216.0f);      // [0, 1)
  return 0.02f * std::sqrt(-2.0f * std::log(u1)) * std::cos(6.2831853f * u2);
}

}  // namespace

std::unique_ptr<ModelWeights> RandomModelWeights(const ModelConfig& c, DType dtype, uint64_t seed,
                                                 int rank, int world) {
  CHECK(world >= 1 && rank >= 0 && rank < world && CheckTensorParallelSplit(c, world).ok())
      << "RandomModelWeights: rank " << rank << " of " << world << " cannot split this model";
  // Rows [row_begin, row_begin + rows) and columns [col_begin, col_begin + cols) of tensor
  // `tensor`, a [full_rows, full_cols] matrix.
  auto matrix = [&](uint64_t tensor, int64_t full_cols, int64_t row_begin, int64_t rows,
                    int64_t col_begin, int64_t cols) {
    Matrix m;
    m.dtype = dtype;
    m.rows = rows;
    m.cols = cols;
    m.owned.resize(static_cast<size_t>(rows * cols * DTypeBytes(dtype)));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < cols; ++k) {
        const uint64_t index = static_cast<uint64_t>((row_begin + r) * full_cols + col_begin + k);
        const float v = RandomWeight(seed, tensor, index);
        const int64_t i = r * cols + k;
        if (dtype == DType::kF32) {
          std::memcpy(m.owned.data() + i * 4, &v, 4);
        } else {
          const uint16_t h = dtype == DType::kBF16 ? FloatToBf16(v) : FloatToF16(v);
          std::memcpy(m.owned.data() + i * 2, &h, 2);
        }
      }
    }
    m.data = m.owned.data();
    return m;
  };
  auto w = std::make_unique<ModelWeights>();
  w->config = c;
  w->rank = rank;
  w->world_size = world;
  w->num_heads = c.num_heads / world;
  w->num_kv_heads = c.num_kv_heads / world;
  w->intermediate_size = c.intermediate_size / world;
  const int64_t H = c.hidden_size, D = c.head_dim;
  const int64_t q_rows = w->num_heads * D, kv_rows = w->num_kv_heads * D;
  const int64_t I = w->intermediate_size;
  const int64_t vocab_share = (c.vocab_size + world - 1) / world;
  w->vocab_begin = std::min<int64_t>(c.vocab_size, rank * vocab_share);
  const int64_t vocab_rows =
      std::min<int64_t>(c.vocab_size, w->vocab_begin + vocab_share) - w->vocab_begin;
  w->embed = matrix(0, H, 0, c.vocab_size, 0, H);
  w->lm_head = matrix(1, H, w->vocab_begin, vocab_rows, 0, H);
  w->final_norm.assign(H, 1.0f);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const uint64_t t = 2 + 7 * static_cast<uint64_t>(l);
    LayerWeights L;
    L.q = matrix(t, H, rank * q_rows, q_rows, 0, H);
    L.k = matrix(t + 1, H, rank * kv_rows, kv_rows, 0, H);
    L.v = matrix(t + 2, H, rank * kv_rows, kv_rows, 0, H);
    L.o = matrix(t + 3, c.q_dim(), 0, H, rank * q_rows, q_rows);
    L.gate = matrix(t + 4, H, rank * I, I, 0, H);
    L.up = matrix(t + 5, H, rank * I, I, 0, H);
    L.down = matrix(t + 6, c.intermediate_size, 0, H, rank * I, I);
    if (c.qkv_bias) {
      L.q_bias.assign(q_rows, 0.0f);
      L.k_bias.assign(kv_rows, 0.0f);
      L.v_bias.assign(kv_rows, 0.0f);
    }
    if (c.qk_norm) {
      L.q_norm.assign(D, 1.0f);
      L.k_norm.assign(D, 1.0f);
    }
    L.input_norm.assign(H, 1.0f);
    L.post_attention_norm.assign(H, 1.0f);
    w->layers.push_back(std::move(L));
  }
  return w;
}

}  // namespace strata

// MoE routing ops: C++ CPU kernels, device dispatchers and Python bindings.
//
// Contracts shared with csrc/cuda/moe_*.cu and megatron_lite/ops/reference.py:
//   * Top-k order: larger logit (compared in fp32) first; equal logits -> lower expert index
//     first. Selecting on the logits rather than on the probabilities keeps faces in agreement
//     even when two different logits round to the same probability.
//   * Weights: softmax over all E experts, restricted to the k selected and renormalised. The
//     full-softmax normaliser cancels, so w_j = exp(l_j - l_top) / sum_i exp(l_i - l_top) over
//     the selected i only. NaN logits are read as -inf by the compiled faces (documented as
//     unspecified in Python).
//   * row_map: permuted row r came from token row_map[r] / k, slot row_map[r] % k, i.e. it is
//     the stable argsort of indices.flatten() (grouped by expert, token order within one).
//   * inv (the inverse permutation): inv[t * k + j] is the permuted row of (token t, slot j).
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "registry.h"
#ifdef WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace {

using at::Tensor;

// Strict total order used by every top-k face: (value desc, index asc).
inline bool ranks_before(float v, int64_t i, float bv, int64_t bi) { return v > bv || (v == bv && i < bi); }

template <typename scalar_t>
inline float load_logit(const scalar_t* row, int64_t e) {
  const float v = static_cast<float>(row[e]);
  return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
}

// k rounds of arg-max; round r only considers experts ranked after the one picked in round r-1,
// which avoids a "taken" mask and works for any E. O(k * E), fine for router sizes.
template <typename scalar_t>
void topk_row(const scalar_t* row, int64_t E, int64_t k, float* w, int64_t* idx) {
  float prev_v = 0.0f, top = 0.0f, denom = 0.0f;
  int64_t prev_i = -1;
  for (int64_t r = 0; r < k; ++r) {
    float bv = -std::numeric_limits<float>::infinity();
    int64_t bi = E;  // sentinel: any real expert ranks before it
    for (int64_t e = 0; e < E; ++e) {
      const float v = load_logit(row, e);
      const bool eligible = r == 0 || v < prev_v || (v == prev_v && e > prev_i);
      if (eligible && ranks_before(v, e, bv, bi)) {
        bv = v;
        bi = e;
      }
    }
    if (r == 0) top = bv;
    w[r] = std::exp(bv - top);
    denom += w[r];
    idx[r] = bi;
    prev_v = bv;
    prev_i = bi;
  }
  for (int64_t r = 0; r < k; ++r) w[r] /= denom;
}

std::tuple<Tensor, Tensor, Tensor> moe_topk_softmax_cpu(const Tensor& logits, int64_t k) {
  const int64_t T = logits.size(0), E = logits.size(1);
  auto weights = at::empty({T, k}, logits.options().dtype(at::kFloat));
  auto indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  auto counts = at::zeros({E}, logits.options().dtype(at::kLong));
  float* w = weights.data_ptr<float>();
  int64_t* idx = indices.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_topk_softmax_cpu", [&] {
    const scalar_t* l = logits.data_ptr<scalar_t>();
    at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) topk_row(l + t * E, E, k, w + t * k, idx + t * k);
    });
  });
  // The histogram is T * k increments: cheaper serially than merging per-thread copies.
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * k; ++i) ++c[idx[i]];
  return {weights, indices, counts};
}

// Stable argsort of the flat expert indices: counting sort when the expert range is small
// (always, for real routers), std::stable_sort otherwise so a huge index cannot allocate a huge
// histogram.
Tensor stable_expert_order(const Tensor& indices) {
  const int64_t n = indices.numel();
  const int64_t* e = indices.data_ptr<int64_t>();
  auto row_map = at::empty({n}, indices.options());
  int64_t* out = row_map.data_ptr<int64_t>();
  if (n == 0) return row_map;
  const auto [lo, hi] = std::minmax_element(e, e + n);
  TORCH_CHECK(*lo >= 0, "moe_permute: expert indices must be >= 0, got ", *lo);
  const int64_t num_bins = *hi + 1;
  if (num_bins <= std::max<int64_t>(n, 1 << 16)) {
    std::vector<int64_t> next(num_bins + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++next[e[i] + 1];
    for (int64_t b = 0; b < num_bins; ++b) next[b + 1] += next[b];
    for (int64_t i = 0; i < n; ++i) out[next[e[i]]++] = i;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = i;
    std::stable_sort(out, out + n, [e](int64_t a, int64_t b) { return e[a] < e[b]; });
  }
  return row_map;
}

// Row gather shared by permute: dtype-agnostic byte copies, parallel over output rows.
Tensor gather_rows_cpu(const Tensor& src, const Tensor& row_map, int64_t k) {
  const int64_t n = row_map.numel(), H = src.size(1);
  auto out = at::empty({n, H}, src.options());
  const size_t row_bytes = static_cast<size_t>(H) * src.element_size();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(out.data_ptr());
  const int64_t* rm = row_map.data_ptr<int64_t>();
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, H)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::memcpy(d + r * row_bytes, s + (rm[r] / k) * row_bytes, row_bytes);
  });
  return out;
}

// inv[row_map[r]] = r, checking that row_map is a permutation of [0, n).
Tensor inverse_map_cpu(const Tensor& row_map) {
  const int64_t n = row_map.numel();
  auto inv = at::full({n}, -1, row_map.options());
  int64_t* iv = inv.data_ptr<int64_t>();
  const int64_t* rm = row_map.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    const int64_t src = rm[r];
    TORCH_CHECK(src >= 0 && src < n && iv[src] == -1, "moe_unpermute: row_map is not a permutation of [0, ", n,
                ") (entry ", r, " = ", src, ")");
    iv[src] = r;
  }
  return inv;
}

Tensor moe_unpermute_cpu(const Tensor& permuted, const Tensor& inv, const Tensor& weights, int64_t k) {
  const int64_t H = permuted.size(1), T = inv.numel() / k;
  auto out = at::empty({T, H}, permuted.options());
  const int64_t* iv = inv.data_ptr<int64_t>();
  const float* w = weights.defined() ? weights.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, permuted.scalar_type(), "moe_unpermute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = permuted.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(H);  // [H] fp32 accumulator, one per worker
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const acc_t wj = w ? static_cast<acc_t>(w[t * k + j]) : acc_t(1);
          const scalar_t* row = p + iv[t * k + j] * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += wj * static_cast<acc_t>(row[h]);
        }
        for (int64_t h = 0; h < H; ++h) o[t * H + h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> moe_unpermute_backward_cpu(const Tensor& grad_out, const Tensor& permuted,
                                                      const Tensor& inv, const Tensor& weights, int64_t k,
                                                      bool need_weights_grad) {
  const int64_t H = permuted.size(1), T = inv.numel() / k;
  auto grad_permuted = at::empty_like(permuted);
  auto grad_weights = need_weights_grad ? at::empty({T, k}, weights.options()) : Tensor();
  const int64_t* iv = inv.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  float* gw = need_weights_grad ? grad_weights.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, permuted.scalar_type(), "moe_unpermute_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const scalar_t* p = permuted.data_ptr<scalar_t>();
    scalar_t* gp = grad_permuted.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g = go + t * H;  // [H]
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = iv[t * k + j];
          const acc_t wj = static_cast<acc_t>(w[t * k + j]);
          acc_t dot = 0;
          for (int64_t h = 0; h < H; ++h) {
            gp[r * H + h] = static_cast<scalar_t>(wj * static_cast<acc_t>(g[h]));
            if (gw) dot += static_cast<acc_t>(g[h]) * static_cast<acc_t>(p[r * H + h]);
          }
          if (gw) gw[t * k + j] = static_cast<float>(dot);
        }
      }
    });
  });
  return {grad_permuted, grad_weights};
}

// ---- Device dispatchers. Python (megatron_lite/ops) validates with friendly messages; the
// checks here only protect direct callers from out-of-bounds reads.

void check_2d(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), op, ": ", name, " must be a contiguous 2-D tensor, got ",
              t.sizes());
}

void no_cuda(const char* op) { TORCH_CHECK(false, op, ": megatron_lite._C was built without CUDA"); }

void check_cpu(const Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cpu(), op, ": unsupported device ", t.device());
}

std::tuple<Tensor, Tensor, Tensor> moe_topk_softmax(const Tensor& logits, int64_t k) {
  check_2d(logits, "moe_topk_softmax", "logits");
  TORCH_CHECK(k >= 1 && k <= logits.size(1), "moe_topk_softmax: need 1 <= k <= E, got k=", k);
  if (logits.is_cuda()) {
#ifdef WITH_CUDA
    return moe_topk_softmax_cuda(logits, k);
#else
    no_cuda("moe_topk_softmax");
#endif
  }
  check_cpu(logits, "moe_topk_softmax");
  return moe_topk_softmax_cpu(logits, k);
}

std::tuple<Tensor, Tensor> moe_permute(const Tensor& x, const Tensor& indices) {
  check_2d(x, "moe_permute", "x");
  check_2d(indices, "moe_permute", "indices");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.size(0) == x.size(0),
              "moe_permute: indices must be int64 [T, k] with T = x.size(0)");
  const int64_t k = indices.size(1);
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    // A stable device radix sort; the row copy that follows is what costs bandwidth.
    const auto sorted = at::sort(indices.reshape({-1}), std::optional<bool>(true), 0, /*descending=*/false);
    const auto row_map = std::get<1>(sorted);
    return {moe_gather_rows_cuda(x, row_map, k), row_map};
#else
    no_cuda("moe_permute");
#endif
  }
  check_cpu(x, "moe_permute");
  check_cpu(indices, "moe_permute");
  auto row_map = stable_expert_order(indices);
  return {gather_rows_cpu(x, row_map, k), row_map};
}

// inv from row_map: validated on CPU; on CUDA a scatter (validating would need a device sync).
Tensor inverse_map(const Tensor& row_map) {
  if (row_map.is_cpu()) return inverse_map_cpu(row_map);
  auto inv = at::empty_like(row_map);
  return inv.scatter_(0, row_map, at::arange(row_map.numel(), row_map.options()));
}

void check_unpermute_args(const Tensor& permuted, const Tensor& row_map, const Tensor& weights, int64_t k) {
  check_2d(permuted, "moe_unpermute", "permuted");
  TORCH_CHECK(k >= 1, "moe_unpermute: k must be >= 1, got ", k);
  TORCH_CHECK(row_map.dim() == 1 && row_map.scalar_type() == at::kLong && row_map.numel() == permuted.size(0) &&
                  row_map.numel() % k == 0,
              "moe_unpermute: row_map must be int64 [T*k] matching permuted rows");
  if (weights.defined()) {
    check_2d(weights, "moe_unpermute", "weights");
    TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.numel() == row_map.numel() && weights.size(1) == k,
                "moe_unpermute: weights must be float32 [T, k]");
  }
}

// weights may be None (permute backward: plain sum over slots).
Tensor moe_unpermute(const Tensor& permuted, const Tensor& row_map, const std::optional<Tensor>& weights_opt,
                     int64_t k) {
  const Tensor weights = weights_opt.has_value() ? *weights_opt : Tensor();
  check_unpermute_args(permuted, row_map, weights, k);
  const Tensor inv = inverse_map(row_map);
  if (permuted.is_cuda()) {
#ifdef WITH_CUDA
    return moe_unpermute_cuda(permuted, inv, weights, k);
#else
    no_cuda("moe_unpermute");
#endif
  }
  check_cpu(permuted, "moe_unpermute");
  return moe_unpermute_cpu(permuted, inv, weights, k);
}

std::tuple<Tensor, Tensor> moe_unpermute_backward(const Tensor& grad_out, const Tensor& permuted,
                                                  const Tensor& row_map, const Tensor& weights, int64_t k,
                                                  bool need_weights_grad) {
  check_unpermute_args(permuted, row_map, weights, k);
  check_2d(grad_out, "moe_unpermute_backward", "grad_out");
  TORCH_CHECK(weights.defined(), "moe_unpermute_backward: weights are required");
  TORCH_CHECK(grad_out.scalar_type() == permuted.scalar_type() && grad_out.size(0) * k == permuted.size(0) &&
                  grad_out.size(1) == permuted.size(1),
              "moe_unpermute_backward: grad_out must be [T, H] with the dtype of permuted");
  const Tensor inv = inverse_map(row_map);
  if (permuted.is_cuda()) {
#ifdef WITH_CUDA
    return moe_unpermute_backward_cuda(grad_out, permuted, inv, weights, k, need_weights_grad);
#else
    no_cuda("moe_unpermute_backward");
#endif
  }
  check_cpu(grad_out, "moe_unpermute_backward");
  return moe_unpermute_backward_cpu(grad_out, permuted, inv, weights, k, need_weights_grad);
}

}  // namespace

void register_moe_ops(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("moe_topk_softmax", &moe_topk_softmax,
        "logits [T, E] -> (weights float32 [T, k], indices int64 [T, k], tokens_per_expert int64 [E])",
        py::arg("logits"), py::arg("k"));
  m.def("moe_permute", &moe_permute, "x [T, H], indices int64 [T, k] -> (permuted [T*k, H], row_map int64 [T*k])",
        py::arg("x"), py::arg("indices"));
  m.def("moe_unpermute", &moe_unpermute,
        "permuted [T*k, H], row_map [T*k], weights float32 [T, k] or None, k -> [T, H] (fp32 accumulation)",
        py::arg("permuted"), py::arg("row_map"), py::arg("weights"), py::arg("k"));
  m.def("moe_unpermute_backward", &moe_unpermute_backward,
        "(grad_out [T, H], permuted, row_map, weights float32 [T, k], k, need_weights_grad) -> "
        "(grad_permuted [T*k, H], grad_weights float32 [T, k] or None)",
        py::arg("grad_out"), py::arg("permuted"), py::arg("row_map"), py::arg("weights"), py::arg("k"),
        py::arg("need_weights_grad"));
}

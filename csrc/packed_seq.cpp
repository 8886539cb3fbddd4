// Packed-sequence metadata: the C++ CPU kernel, the device dispatcher and the Python binding.
//
// Contract (shared by the CUDA kernel in cuda/packed_seq_kernels.cu and the pure-torch
// reference in megatron_lite/ops/reference.py):
//   * Every row of tokens [b, s] starts a new document; a document ends right after an EOD
//     token (the EOD belongs to the document it closes). An EOD in the last column does not
//     open an empty document; a row without EOD is a single document.
//   * cu_seqlens (int32 [docs + 1]) holds the document boundaries over the flattened batch:
//     0, then for each row the end (flat index + 1) of every EOD not in the last column,
//     then the row end (row + 1) * s.
//   * position_ids (int64 [b, s]) restart at 0 at every document start.
//   * loss_mask (float32 [b, s]) is 0 where the input token is EOD, 1 elsewhere.
//   * max_seqlen is the longest document (0 for an empty batch).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "registry.h"
#ifdef WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace {

using Metadata = std::tuple<at::Tensor, int64_t, at::Tensor, at::Tensor>;

struct RowStats {
  int64_t docs;     // documents in this row (>= 1 when s > 0)
  int64_t longest;  // longest document in this row
};

// Pass 1 over one row: position ids and loss mask, plus what pass 2 needs to place the row.
RowStats scan_row(const int64_t* tok, int64_t s, int64_t eod, int64_t* pos, float* mask) {
  int64_t start = 0;  // flat column where the current document began
  int64_t longest = 0;
  int64_t inner_eods = 0;  // EODs that close a document before the last column
  for (int64_t i = 0; i < s; ++i) {
    const bool is_eod = tok[i] == eod;
    pos[i] = i - start;
    mask[i] = is_eod ? 0.0f : 1.0f;
    if (is_eod) {
      longest = std::max(longest, i + 1 - start);
      start = i + 1;
      if (i + 1 < s) ++inner_eods;
    }
  }
  // The document still open at the row end (empty when the row ended with EOD).
  longest = std::max(longest, s - start);
  return {inner_eods + 1, longest};
}

// Pass 2 over one row: writes its document ends into its own slice of cu_seqlens.
void write_row_ends(const int64_t* tok, int64_t s, int64_t eod, int64_t row_base, int32_t* ends) {
  int64_t n = 0;
  for (int64_t i = 0; i + 1 < s; ++i) {
    if (tok[i] == eod) ends[n++] = static_cast<int32_t>(row_base + i + 1);
  }
  ends[n] = static_cast<int32_t>(row_base + s);
}

Metadata packed_seq_metadata_cpu(const at::Tensor& tokens, int64_t eod_id) {
  const int64_t b = tokens.size(0);
  const int64_t s = tokens.size(1);
  auto position_ids = at::empty({b, s}, tokens.options().dtype(at::kLong));
  auto loss_mask = at::empty({b, s}, tokens.options().dtype(at::kFloat));
  if (b == 0 || s == 0) {
    return {at::zeros({1}, tokens.options().dtype(at::kInt)), 0, position_ids, loss_mask};
  }
  const int64_t* tok = tokens.data_ptr<int64_t>();
  int64_t* pos = position_ids.data_ptr<int64_t>();
  float* mask = loss_mask.data_ptr<float>();

  // Rows are independent, so pass 1 parallelises over rows; the grain keeps tiny rows batched.
  std::vector<RowStats> stats(b);
  const int64_t grain = std::max<int64_t>(1, 32768 / s);
  at::parallel_for(0, b, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      stats[r] = scan_row(tok + r * s, s, eod_id, pos + r * s, mask + r * s);
    }
  });

  // Exclusive prefix sum of documents per row gives each row's slice of cu_seqlens.
  std::vector<int64_t> offset(b);
  int64_t total = 0, longest = 0;
  for (int64_t r = 0; r < b; ++r) {
    offset[r] = total;
    total += stats[r].docs;
    longest = std::max(longest, stats[r].longest);
  }
  auto cu_seqlens = at::empty({total + 1}, tokens.options().dtype(at::kInt));
  int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  cu[0] = 0;
  at::parallel_for(0, b, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) write_row_ends(tok + r * s, s, eod_id, r * s, cu + 1 + offset[r]);
  });
  return {cu_seqlens, longest, position_ids, loss_mask};
}

// Device dispatcher. The Python layer (megatron_lite/ops) gives friendly errors; these checks
// only stop a direct caller from reading out of bounds.
Metadata packed_seq_metadata(const at::Tensor& tokens, int64_t eod_id) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong,
              "packed_seq_metadata: tokens must be int64 [b, s], got ", tokens.scalar_type(), " ",
              tokens.sizes());
  TORCH_CHECK(tokens.is_contiguous(), "packed_seq_metadata: tokens must be contiguous");
  TORCH_CHECK(tokens.numel() < std::numeric_limits<int32_t>::max(),
              "packed_seq_metadata: b * s must fit in int32 for cu_seqlens, got ", tokens.numel());
  if (tokens.is_cuda()) {
#ifdef WITH_CUDA
    return packed_seq_metadata_cuda(tokens, eod_id);
#else
    TORCH_CHECK(false, "packed_seq_metadata: megatron_lite._C was built without CUDA");
#endif
  }
  TORCH_CHECK(tokens.is_cpu(), "packed_seq_metadata: unsupported device ", tokens.device());
  return packed_seq_metadata_cpu(tokens, eod_id);
}

}  // namespace

void register_packed_seq_ops(pybind11::module_& m) {
  m.def("packed_seq_metadata", &packed_seq_metadata,
        "tokens int64 [b, s] -> (cu_seqlens int32 [docs+1], max_seqlen, position_ids int64 [b, s], "
        "loss_mask float32 [b, s])",
        pybind11::arg("tokens"), pybind11::arg("eod_id"));
}

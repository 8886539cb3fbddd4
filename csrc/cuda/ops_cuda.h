// CUDA launchers for the packed-sequence and MoE routing ops.
//
// Declared here, defined in csrc/cuda/*.cu, called from the device dispatchers in
// csrc/packed_seq.cpp and csrc/moe_routing.cpp (only when built with -DWITH_CUDA).
// Callers pass contiguous tensors with validated dtypes and shapes; the launchers only
// re-check what would otherwise turn into an out-of-bounds access.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

// tokens int64 [b, s] -> (cu_seqlens int32 [docs + 1], max_seqlen, position_ids int64 [b, s],
// loss_mask float32 [b, s]). Same contract as the CPU kernel in packed_seq.cpp.
std::tuple<at::Tensor, int64_t, at::Tensor, at::Tensor> packed_seq_metadata_cuda(const at::Tensor& tokens,
                                                                                 int64_t eod_id);

// logits [T, E] -> (weights float32 [T, k], indices int64 [T, k], tokens_per_expert int64 [E]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_topk_softmax_cuda(const at::Tensor& logits, int64_t k);

// out[r] = src[row_map[r] / k]: the row gather of moe_permute.  src [T, H] -> out [T*k, H].
at::Tensor moe_gather_rows_cuda(const at::Tensor& src, const at::Tensor& row_map, int64_t k);

// out[t] = sum_j w[t, j] * permuted[inv[t*k + j]] (w == 1 when weights is undefined), fp32 accumulation.
at::Tensor moe_unpermute_cuda(const at::Tensor& permuted, const at::Tensor& inv, const at::Tensor& weights,
                              int64_t k);

// Backward of moe_unpermute: grad_permuted[inv[t*k + j]] = w[t, j] * grad_out[t] and, when
// need_weights_grad, grad_weights[t, j] = <grad_out[t], permuted[inv[t*k + j]]> (fp32).
std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cuda(const at::Tensor& grad_out,
                                                               const at::Tensor& permuted, const at::Tensor& inv,
                                                               const at::Tensor& weights, int64_t k,
                                                               bool need_weights_grad);

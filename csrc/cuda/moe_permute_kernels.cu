// CUDA faces of moe_permute / moe_unpermute and its backward (contract: csrc/moe_routing.cpp).
//
// These ops only move rows, so they are bandwidth bound: one block walks one row at a time and
// each thread moves 16-byte vectors (8 bf16) whenever the hidden size and the base pointers
// allow it (otherwise one element at a time). Every gather reads through row_map / inv, so the
// writes stay contiguous and no atomics are needed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <cub/block/block_reduce.cuh>

#include "common.cuh"
#include "ops_cuda.h"

namespace {

using megatron_lite::cuda::AlignedVec;
using megatron_lite::cuda::grid_for;
using megatron_lite::cuda::vec_width;

constexpr int kThreads = 256;

// permuted[r] = src[row_map[r] / k]
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ row_map, int64_t n_rows,
                       int64_t H, int64_t k, scalar_t* __restrict__ dst) {
  using Vec = AlignedVec<scalar_t, VEC>;
  const int64_t n_vec = H / VEC;
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const Vec* in = reinterpret_cast<const Vec*>(src + (row_map[r] / k) * H);
    Vec* out = reinterpret_cast<Vec*>(dst + r * H);
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) out[i] = in[i];
  }
}

// out[t] = sum_j w[t, j] * permuted[inv[t*k + j]], accumulated in opmath (fp32 for bf16/fp16).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    unpermute_kernel(const scalar_t* __restrict__ permuted, const int64_t* __restrict__ inv,
                     const float* __restrict__ weights, int64_t T, int64_t H, int64_t k, scalar_t* __restrict__ out) {
  using Vec = AlignedVec<scalar_t, VEC>;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_vec = H / VEC;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      acc_t acc[VEC];
      for (int u = 0; u < VEC; ++u) acc[u] = acc_t(0);
      for (int64_t j = 0; j < k; ++j) {  // slot order, as in the CPU kernel
        const acc_t w = weights != nullptr ? static_cast<acc_t>(weights[t * k + j]) : acc_t(1);
        const Vec v = reinterpret_cast<const Vec*>(permuted + inv[t * k + j] * H)[i];
        for (int u = 0; u < VEC; ++u) acc[u] += w * static_cast<acc_t>(v.val[u]);
      }
      Vec o;
      for (int u = 0; u < VEC; ++u) o.val[u] = static_cast<scalar_t>(acc[u]);
      reinterpret_cast<Vec*>(out + t * H)[i] = o;
    }
  }
}

// grad_permuted[inv[t*k + j]] = w[t, j] * grad_out[t]; grad_w[t, j] = <grad_out[t], permuted[...]>.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    unpermute_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ permuted,
                              const int64_t* __restrict__ inv, const float* __restrict__ weights, int64_t T,
                              int64_t H, int64_t k, scalar_t* __restrict__ grad_permuted,
                              float* __restrict__ grad_weights) {
  using Vec = AlignedVec<scalar_t, VEC>;
  using acc_t = at::opmath_type<scalar_t>;
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t n_vec = H / VEC;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const Vec* g = reinterpret_cast<const Vec*>(grad_out + t * H);  // re-read per slot; stays in L1/L2
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = inv[t * k + j];
      const acc_t w = static_cast<acc_t>(weights[t * k + j]);
      const Vec* p = reinterpret_cast<const Vec*>(permuted + r * H);
      Vec* gp = reinterpret_cast<Vec*>(grad_permuted + r * H);
      acc_t dot = 0;
      for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
        const Vec gv = g[i];
        Vec o;
        for (int u = 0; u < VEC; ++u) o.val[u] = static_cast<scalar_t>(w * static_cast<acc_t>(gv.val[u]));
        gp[i] = o;
        if (grad_weights != nullptr) {
          const Vec pv = p[i];
          for (int u = 0; u < VEC; ++u) dot += static_cast<acc_t>(gv.val[u]) * static_cast<acc_t>(pv.val[u]);
        }
      }
      if (grad_weights != nullptr) {  // uniform across the block, so the barrier is safe
        const acc_t total = Reduce(tmp).Sum(dot);
        if (threadIdx.x == 0) grad_weights[t * k + j] = static_cast<float>(total);
        __syncthreads();  // tmp is reused by the next slot
      }
    }
  }
}

}  // namespace

at::Tensor moe_gather_rows_cuda(const at::Tensor& src, const at::Tensor& row_map, int64_t k) {
  const c10::cuda::OptionalCUDAGuard guard(src.device());
  const int64_t n = row_map.numel(), H = src.size(1);
  auto out = at::empty({n, H}, src.options());
  if (n == 0 || H == 0) return out;
  const int width = vec_width(H, src.element_size(), {src.data_ptr(), out.data_ptr()});
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "moe_gather_rows_cuda", [&] {
    ML_DISPATCH_VEC(width, VEC, [&] {
      gather_rows_kernel<scalar_t, VEC><<<grid_for(n, 1), kThreads, 0, stream>>>(
          src.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(), n, H, k, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor moe_unpermute_cuda(const at::Tensor& permuted, const at::Tensor& inv, const at::Tensor& weights,
                              int64_t k) {
  const c10::cuda::OptionalCUDAGuard guard(permuted.device());
  const int64_t H = permuted.size(1), T = inv.numel() / k;
  auto out = at::empty({T, H}, permuted.options());
  if (T == 0 || H == 0) return out;
  const float* w = weights.defined() ? weights.data_ptr<float>() : nullptr;
  const int width = vec_width(H, permuted.element_size(), {permuted.data_ptr(), out.data_ptr()});
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, permuted.scalar_type(), "moe_unpermute_cuda", [&] {
    ML_DISPATCH_VEC(width, VEC, [&] {
      unpermute_kernel<scalar_t, VEC><<<grid_for(T, 1), kThreads, 0, stream>>>(
          permuted.data_ptr<scalar_t>(), inv.data_ptr<int64_t>(), w, T, H, k, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cuda(const at::Tensor& grad_out,
                                                               const at::Tensor& permuted, const at::Tensor& inv,
                                                               const at::Tensor& weights, int64_t k,
                                                               bool need_weights_grad) {
  const c10::cuda::OptionalCUDAGuard guard(permuted.device());
  const int64_t H = permuted.size(1), T = inv.numel() / k;
  auto grad_permuted = at::empty_like(permuted);
  // zeros, not empty: with H == 0 the dot products are empty sums.
  auto grad_weights = need_weights_grad ? at::zeros({T, k}, weights.options()) : at::Tensor();
  if (T == 0 || H == 0) return {grad_permuted, grad_weights};
  const int width = vec_width(H, permuted.element_size(),
                              {grad_out.data_ptr(), permuted.data_ptr(), grad_permuted.data_ptr()});
  float* gw = need_weights_grad ? grad_weights.data_ptr<float>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, permuted.scalar_type(), "moe_unpermute_bwd_cuda", [&] {
    ML_DISPATCH_VEC(width, VEC, [&] {
      unpermute_backward_kernel<scalar_t, VEC><<<grid_for(T, 1), kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), permuted.data_ptr<scalar_t>(), inv.data_ptr<int64_t>(),
          weights.data_ptr<float>(), T, H, k, grad_permuted.data_ptr<scalar_t>(), gw);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_permuted, grad_weights};
}

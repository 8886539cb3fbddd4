// CUDA face of moe_topk_softmax (contract: csrc/moe_routing.cpp).
//
// One warp per token. Each of the k rounds is a warp arg-max over the experts ranked after the
// previous pick under the shared order (value desc, index asc), so no "taken" mask is needed and
// any E works. The per-expert histogram is kept in shared memory and flushed with one global
// atomic per expert per block, instead of T * k contended global atomics.
#include <cmath>

#include "common.cuh"
#include "ops_cuda.h"

namespace {

using megatron_lite::cuda::kFullMask;
using megatron_lite::cuda::kWarp;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kMaxSharedExperts = 8192;  // 32 KiB of int counters

__device__ __forceinline__ bool ranks_before(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

template <typename scalar_t>
__device__ __forceinline__ float load_logit(const scalar_t* row, int e) {
  const float v = static_cast<float>(row[e]);
  return isnan(v) ? -INFINITY : v;  // same reading as the CPU kernel
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    topk_softmax_kernel(const scalar_t* __restrict__ logits, int64_t T, int E, int k, float* __restrict__ weights,
                        int64_t* __restrict__ indices, int64_t* __restrict__ counts) {
  extern __shared__ int hist[];  // [E]
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // t depends only on the warp, so every shuffle below runs with the whole warp converged.
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; t < T; t += warp_stride) {
    const scalar_t* row = logits + t * E;
    float* w = weights + t * k;  // [k]
    float prev_v = 0.0f, top = 0.0f, denom = 0.0f;
    int prev_i = -1;
    for (int r = 0; r < k; ++r) {
      float bv = -INFINITY;
      int bi = E;  // sentinel: any real expert ranks before it
      for (int e = lane; e < E; e += kWarp) {
        const float v = load_logit(row, e);
        const bool eligible = r == 0 || v < prev_v || (v == prev_v && e > prev_i);
        if (eligible && ranks_before(v, e, bv, bi)) {
          bv = v;
          bi = e;
        }
      }
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        const float ov = __shfl_xor_sync(kFullMask, bv, offset);
        const int oi = __shfl_xor_sync(kFullMask, bi, offset);
        if (ranks_before(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      if (r == 0) top = bv;
      const float ex = expf(bv - top);
      denom += ex;  // identical in every lane: all lanes hold the same (bv, bi) after the butterfly
      if (lane == 0) {
        w[r] = ex;
        indices[t * k + r] = bi;
        atomicAdd(&hist[bi], 1);
      }
      prev_v = bv;
      prev_i = bi;
    }
    __syncwarp(kFullMask);  // lane 0's unnormalised weights are visible to the other lanes
    for (int r = lane; r < k; r += kWarp) w[r] = w[r] / denom;
    __syncwarp(kFullMask);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    if (hist[e] != 0) {
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + e), static_cast<unsigned long long>(hist[e]));
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_topk_softmax_cuda(const at::Tensor& logits, int64_t k) {
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E <= kMaxSharedExperts, "moe_topk_softmax: at most ", kMaxSharedExperts, " experts, got ", E);
  auto weights = at::empty({T, k}, logits.options().dtype(at::kFloat));
  auto indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  auto counts = at::zeros({E}, logits.options().dtype(at::kLong));
  if (T == 0) return {weights, indices, counts};
  const unsigned grid = megatron_lite::cuda::grid_for(T, kWarpsPerBlock);
  const size_t shared = static_cast<size_t>(E) * sizeof(int);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_topk_softmax_cuda", [&] {
    topk_softmax_kernel<scalar_t><<<grid, kThreads, shared, stream>>>(
        logits.data_ptr<scalar_t>(), T, static_cast<int>(E), static_cast<int>(k), weights.data_ptr<float>(),
        indices.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, indices, counts};
}

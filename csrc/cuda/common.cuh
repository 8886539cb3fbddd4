// Small device helpers shared by the megatron_lite CUDA kernels.
//
// Only c10 CUDA headers are used (no ATen/cuda/CUDAContext.h): that header pulls in cuBLAS and
// cuSPARSE, which these kernels do not need.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace megatron_lite {
namespace cuda {

// Lanes per warp and the lane-mask type of the *_sync warp builtins, as the hardware has them.
// ROCm builds (torch hipifies this file; USE_ROCM is defined) run 64-lane wavefronts on CDNA
// (MI200/MI300) and 32 on RDNA, and HIP's sync shuffles take 64-bit masks (setup.py defines
// HIP_ENABLE_WARP_SYNC_BUILTINS for them). Kernels derive every per-warp quantity from these.
#if defined(USE_ROCM) || defined(__HIP_PLATFORM_AMD__)
using LaneMask = unsigned long long;
#if defined(__AMDGCN_WAVEFRONT_SIZE)
constexpr int kWarp = __AMDGCN_WAVEFRONT_SIZE;  // device pass: the target's wavefront
#else
constexpr int kWarp = 64;  // host pass: only sizes grids, and kernels use grid-stride loops
#endif
#else
using LaneMask = unsigned;
constexpr int kWarp = 32;
#endif
constexpr LaneMask kFullMask = ~LaneMask{0};  // every lane of the warp
static_assert(sizeof(LaneMask) * 8 >= kWarp, "a lane mask must cover the whole warp");

// N elements moved as one 16-byte (or smaller) transaction.
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

// Elements per 16-byte vector for rows of `row_elems` elements starting at each pointer, or 1
// when a row or base pointer is not 16-byte aligned (odd hidden sizes, offset views).
inline int vec_width(int64_t row_elems, int64_t elem_size, std::initializer_list<const void*> ptrs) {
  const int64_t width = 16 / elem_size;
  if (width <= 1 || row_elems % width != 0) return 1;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return static_cast<int>(width);
}

// Grid size for a grid-stride loop over `work` items of `per_block` each.
inline unsigned grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // enough to fill any GPU; the loop covers the rest
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

}  // namespace cuda
}  // namespace megatron_lite

// Dispatch on the vector width chosen by vec_width (a compile-time constant inside the body).
#define ML_DISPATCH_VEC(width, VEC, ...)          \
  [&] {                                           \
    switch (width) {                              \
      case 8: {                                   \
        constexpr int VEC = 8;                    \
        return __VA_ARGS__();                     \
      }                                           \
      case 4: {                                   \
        constexpr int VEC = 4;                    \
        return __VA_ARGS__();                     \
      }                                           \
      case 2: {                                   \
        constexpr int VEC = 2;                    \
        return __VA_ARGS__();                     \
      }                                           \
      default: {                                  \
        constexpr int VEC = 1;                    \
        return __VA_ARGS__();                     \
      }                                           \
    }                                             \
  }()

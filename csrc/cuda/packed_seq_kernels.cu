// CUDA face of packed_seq_metadata (contract: csrc/packed_seq.cpp).
//
// One thread block per row. A row is walked in tiles of kThreads * kItems tokens; tokens are
// loaded coalesced (warp-transposed into a blocked arrangement) and the document start of each
// token is an exclusive max-scan of "EOD at j -> j + 1", carried from tile to tile.
//   kernel 1: position_ids, loss_mask, documents per row, longest position per row
//   host:     exclusive cumsum of documents per row, one sync for (total docs, max position)
//   kernel 2: each row writes its document ends into its slice of cu_seqlens
#include <cub/block/block_load.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/block/block_store.cuh>

#include "common.cuh"
#include "ops_cuda.h"

namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;
constexpr int kTile = kThreads * kItems;

struct MaxOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};
struct SumOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};

// Carries a scan across tiles: returns the prefix for this tile, folds in the tile aggregate.
// Called by every thread of warp 0; all of them see the same aggregate, so their copies agree.
template <typename Op>
struct TileCarry {
  int64_t running;
  Op op;
  __device__ int64_t operator()(int64_t tile_aggregate) {
    const int64_t prefix = running;
    running = op(running, tile_aggregate);
    return prefix;
  }
};

using Load = cub::BlockLoad<int64_t, kThreads, kItems, cub::BLOCK_LOAD_WARP_TRANSPOSE>;
using StoreLong = cub::BlockStore<int64_t, kThreads, kItems, cub::BLOCK_STORE_WARP_TRANSPOSE>;
using StoreFloat = cub::BlockStore<float, kThreads, kItems, cub::BLOCK_STORE_WARP_TRANSPOSE>;
using Scan = cub::BlockScan<int64_t, kThreads>;
using Reduce = cub::BlockReduce<int64_t, kThreads>;

union TempStorage {
  typename Load::TempStorage load;
  typename StoreLong::TempStorage store_long;
  typename StoreFloat::TempStorage store_float;
  typename Scan::TempStorage scan;
  typename Reduce::TempStorage reduce;
};

__global__ void __launch_bounds__(kThreads)
    row_positions_kernel(const int64_t* __restrict__ tokens, int64_t s, int64_t eod, int64_t* __restrict__ pos,
                         float* __restrict__ mask, int64_t* __restrict__ row_docs, int64_t* __restrict__ row_max_pos) {
  __shared__ TempStorage tmp;
  const int64_t row = blockIdx.x;
  const int64_t* tok_row = tokens + row * s;
  TileCarry<MaxOp> carry{0, MaxOp{}};
  int64_t inner_eods = 0, max_pos = 0;
  for (int64_t base = 0; base < s; base += kTile) {
    const int valid = static_cast<int>(s - base < kTile ? s - base : kTile);
    int64_t tok[kItems];
    Load(tmp.load).Load(tok_row + base, tok, valid, ~eod);  // out-of-row slots read as "not EOD"
    __syncthreads();
    int64_t next_start[kItems];  // [kItems] where the next document starts if this token is EOD
    for (int i = 0; i < kItems; ++i) {
      const int64_t col = base + threadIdx.x * kItems + i;
      next_start[i] = (col < s && tok[i] == eod) ? col + 1 : 0;
    }
    int64_t start[kItems];
    Scan(tmp.scan).ExclusiveScan(next_start, start, MaxOp{}, carry);
    __syncthreads();
    int64_t p[kItems];
    float m[kItems];
    for (int i = 0; i < kItems; ++i) {
      const int64_t col = base + threadIdx.x * kItems + i;
      p[i] = col - start[i];
      m[i] = tok[i] == eod ? 0.0f : 1.0f;
      if (col < s) {
        max_pos = p[i] > max_pos ? p[i] : max_pos;
        if (tok[i] == eod && col + 1 < s) ++inner_eods;
      }
    }
    StoreLong(tmp.store_long).Store(pos + row * s + base, p, valid);
    __syncthreads();
    StoreFloat(tmp.store_float).Store(mask + row * s + base, m, valid);
    __syncthreads();
  }
  const int64_t eods = Reduce(tmp.reduce).Sum(inner_eods);
  __syncthreads();
  const int64_t longest = Reduce(tmp.reduce).Reduce(max_pos, MaxOp{});
  if (threadIdx.x == 0) {
    row_docs[row] = eods + 1;
    row_max_pos[row] = longest;
  }
}

__global__ void __launch_bounds__(kThreads)
    row_ends_kernel(const int64_t* __restrict__ tokens, int64_t s, int64_t eod,
                    const int64_t* __restrict__ row_offset, int32_t* __restrict__ cu_seqlens) {
  __shared__ TempStorage tmp;
  const int64_t row = blockIdx.x;
  const int64_t* tok_row = tokens + row * s;
  int32_t* ends = cu_seqlens + 1 + row_offset[row];  // this row's slice
  TileCarry<SumOp> carry{0, SumOp{}};
  for (int64_t base = 0; base < s; base += kTile) {
    const int valid = static_cast<int>(s - base < kTile ? s - base : kTile);
    int64_t tok[kItems];
    Load(tmp.load).Load(tok_row + base, tok, valid, ~eod);  // out-of-row slots read as "not EOD"
    __syncthreads();
    int64_t is_end[kItems];
    for (int i = 0; i < kItems; ++i) {
      const int64_t col = base + threadIdx.x * kItems + i;
      is_end[i] = (col + 1 < s && tok[i] == eod) ? 1 : 0;
    }
    int64_t rank[kItems];
    Scan(tmp.scan).ExclusiveScan(is_end, rank, SumOp{}, carry);
    __syncthreads();
    for (int i = 0; i < kItems; ++i) {
      const int64_t col = base + threadIdx.x * kItems + i;
      if (is_end[i]) ends[rank[i]] = static_cast<int32_t>(row * s + col + 1);
    }
  }
  // carry.running (identical in warp 0) is the number of inner ends; the row end follows them.
  if (threadIdx.x == 0) {
    ends[carry.running] = static_cast<int32_t>((row + 1) * s);
    if (row == 0) cu_seqlens[0] = 0;
  }
}

}  // namespace

std::tuple<at::Tensor, int64_t, at::Tensor, at::Tensor> packed_seq_metadata_cuda(const at::Tensor& tokens,
                                                                                 int64_t eod_id) {
  const c10::cuda::OptionalCUDAGuard guard(tokens.device());
  const int64_t b = tokens.size(0), s = tokens.size(1);
  auto position_ids = at::empty({b, s}, tokens.options().dtype(at::kLong));
  auto loss_mask = at::empty({b, s}, tokens.options().dtype(at::kFloat));
  if (b == 0 || s == 0) {
    return {at::zeros({1}, tokens.options().dtype(at::kInt)), 0, position_ids, loss_mask};
  }
  TORCH_CHECK(b <= 0x7fffffff, "packed_seq_metadata: too many rows for one launch: ", b);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto stats = at::empty({2, b}, tokens.options().dtype(at::kLong));  // [docs per row; max pos per row]
  row_positions_kernel<<<static_cast<unsigned>(b), kThreads, 0, stream>>>(
      tokens.data_ptr<int64_t>(), s, eod_id, position_ids.data_ptr<int64_t>(), loss_mask.data_ptr<float>(),
      stats[0].data_ptr<int64_t>(), stats[1].data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const auto docs = stats[0];
  const auto offset = docs.cumsum(0) - docs;  // exclusive prefix: first slot of each row
  // The one unavoidable sync: the output size and the Python int need host values.
  const auto summary = at::stack({docs.sum(), stats[1].max()}).cpu();
  const int64_t total = summary[0].item<int64_t>();
  const int64_t max_seqlen = summary[1].item<int64_t>() + 1;

  auto cu_seqlens = at::empty({total + 1}, tokens.options().dtype(at::kInt));
  row_ends_kernel<<<static_cast<unsigned>(b), kThreads, 0, stream>>>(
      tokens.data_ptr<int64_t>(), s, eod_id, offset.data_ptr<int64_t>(), cu_seqlens.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {cu_seqlens, max_seqlen, position_ids, loss_mask};
}

// Dataset index builders for megatron_lite.data: document/sample/shuffle indices of GPTDataset,
// blending indices of BlendedDataset and first-fit-decreasing bin packing of instruction data.
//
// Every function here has a numpy twin in megatron_lite/data/index_reference.py that produces
// identical arrays; tests compare the two. Shuffles are Fisher-Yates driven by a counter-based
// generator (splitmix64 over (seed, stream, position)) so the reference can draw the same
// numbers vectorised.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "registry.h"

namespace py = pybind11;

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Base state of one random stream: distinct streams of one seed are independent.
inline uint64_t stream_base(int64_t seed, uint64_t stream) {
  return mix64(static_cast<uint64_t>(seed) ^ (stream * kGolden));
}

// In-place Fisher-Yates: for i = n-1 .. 1 swap a[i] with a[j], j = hi32(key_i) * (i+1) >> 32.
template <typename T>
void shuffle_inplace(T* a, int64_t n, int64_t seed, uint64_t stream) {
  if (n >= (int64_t(1) << 32)) throw std::invalid_argument("shuffle: at most 2^32 - 1 elements");
  const uint64_t base = stream_base(seed, stream);
  for (int64_t i = n - 1; i > 0; --i) {
    const uint64_t key = mix64(base + static_cast<uint64_t>(i) * kGolden);
    const uint64_t j = ((key >> 32) * static_cast<uint64_t>(i + 1)) >> 32;
    std::swap(a[i], a[j]);
  }
}

// documents [n] tiled num_epochs times, shuffled (the last epoch apart when separate_final_epoch).
py::array_t<int32_t> build_document_index(CArray<int64_t> documents, int64_t num_epochs, int64_t seed,
                                          bool separate_final_epoch) {
  if (num_epochs < 1) throw std::invalid_argument("build_document_index: num_epochs must be >= 1");
  const int64_t n = documents.size();
  const int64_t* docs = documents.data();
  for (int64_t i = 0; i < n; ++i) {
    if (docs[i] < 0 || docs[i] > std::numeric_limits<int32_t>::max())
      throw std::invalid_argument("build_document_index: document id " + std::to_string(docs[i]) +
                                  " outside int32");
  }
  py::array_t<int32_t> out(n * num_epochs);
  int32_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t e = 0; e < num_epochs; ++e)
      for (int64_t i = 0; i < n; ++i) o[e * n + i] = static_cast<int32_t>(docs[i]);
    if (separate_final_epoch && num_epochs > 1) {
      shuffle_inplace(o, n * (num_epochs - 1), seed, 0);
      shuffle_inplace(o + n * (num_epochs - 1), n, seed, 1);
    } else {
      shuffle_inplace(o, n * num_epochs, seed, 0);
    }
  }
  return out;
}

// Sample i spans (doc_index position, offset) rows i .. i+1 inclusive: seq_length + 1 tokens,
// consecutive samples sharing one token. Row 0 is (0, 0).
py::array_t<int64_t> build_sample_index(CArray<int32_t> sizes, CArray<int32_t> document_index, int64_t seq_length,
                                        int64_t num_samples) {
  if (seq_length < 1) throw std::invalid_argument("build_sample_index: seq_length must be >= 1");
  if (num_samples < 0) throw std::invalid_argument("build_sample_index: num_samples must be >= 0");
  const int32_t* sz = sizes.data();
  const int32_t* doc = document_index.data();
  const int64_t n_sizes = sizes.size();
  const int64_t n_doc = document_index.size();
  for (int64_t i = 0; i < n_doc; ++i) {
    if (doc[i] < 0 || doc[i] >= n_sizes)
      throw std::invalid_argument("build_sample_index: document id " + std::to_string(doc[i]) + " out of range");
  }
  py::array_t<int64_t> out({num_samples + 1, int64_t(2)});
  int64_t* o = out.mutable_data();
  bool exhausted = false;
  {
    py::gil_scoped_release release;
    int64_t doc_pos = 0, offset = 0;
    o[0] = 0;
    o[1] = 0;
    for (int64_t s = 1; s <= num_samples && !exhausted; ++s) {
      int64_t remaining = seq_length + 1;
      while (remaining != 0) {
        if (doc_pos >= n_doc) {
          exhausted = true;
          break;
        }
        const int64_t avail = static_cast<int64_t>(sz[doc[doc_pos]]) - offset;
        remaining -= avail;
        if (remaining <= 0) {
          offset += remaining + avail - 1;  // last consumed token stays in this document
          remaining = 0;
        } else {
          ++doc_pos;
          offset = 0;
        }
      }
      o[2 * s] = doc_pos;
      o[2 * s + 1] = offset;
    }
  }
  if (exhausted) throw std::invalid_argument("build_sample_index: document index has too few tokens");
  return out;
}

// Positions [0, num_samples) shuffled (stream 2) followed by [num_samples, total_size) (stream 3).
py::array_t<int64_t> build_shuffle_index(int64_t num_samples, int64_t total_size, int64_t seed) {
  if (num_samples < 0 || total_size < num_samples)
    throw std::invalid_argument("build_shuffle_index: need 0 <= num_samples <= total_size");
  py::array_t<int64_t> out(total_size);
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    std::iota(o, o + total_size, int64_t(0));
    shuffle_inplace(o, num_samples, seed, 2);
    shuffle_inplace(o + num_samples, total_size - num_samples, seed, 3);
  }
  return out;
}

// Greedy blending: step i picks the dataset with the largest weight * max(i, 1) - picked_so_far
// (first one on ties) and records how many samples it had given before.
std::tuple<py::array_t<int16_t>, py::array_t<int64_t>> build_blending_indices(CArray<double> weights,
                                                                              int64_t size) {
  const int64_t n = weights.size();
  if (n < 1 || n > std::numeric_limits<int16_t>::max())
    throw std::invalid_argument("build_blending_indices: need 1 to 32767 datasets");
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be >= 0");
  const double* w = weights.data();
  for (int64_t d = 0; d < n; ++d)
    if (!(w[d] >= 0.0)) throw std::invalid_argument("build_blending_indices: weights must be >= 0");
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t* di = dataset_index.mutable_data();
  int64_t* dsi = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> picked(n, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double step = std::max(static_cast<double>(i), 1.0);
      int64_t best = 0;
      double best_err = w[0] * step - static_cast<double>(picked[0]);
      for (int64_t d = 1; d < n; ++d) {
        const double err = w[d] * step - static_cast<double>(picked[d]);
        if (err > best_err) {
          best_err = err;
          best = d;
        }
      }
      di[i] = static_cast<int16_t>(best);
      dsi[i] = picked[best]++;
    }
  }
  return {dataset_index, dataset_sample_index};
}

// First-fit decreasing: items sorted by length (descending, stable) go to the first bin with
// room. Returns the bin of every item; bins are numbered in the order they open.
py::array_t<int64_t> ffd_pack(CArray<int64_t> lengths, int64_t capacity) {
  const int64_t n = lengths.size();
  const int64_t* len = lengths.data();
  for (int64_t i = 0; i < n; ++i) {
    if (len[i] < 0 || len[i] > capacity)
      throw std::invalid_argument("ffd_pack: item " + std::to_string(i) + " has length " + std::to_string(len[i]) +
                                  ", outside [0, capacity=" + std::to_string(capacity) + "]");
  }
  py::array_t<int64_t> out(n);
  int64_t* bin_of = out.mutable_data();
  if (n == 0) return out;
  {
    py::gil_scoped_release release;
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len[a] > len[b]; });
    // Max segment tree over the remaining room of n potential bins (unopened bins are empty,
    // and lie right of every opened one, so the leftmost fit is the first-fit bin).
    int64_t leaves = 1;
    while (leaves < n) leaves <<= 1;
    std::vector<int64_t> tree(2 * leaves, -1);
    for (int64_t b = 0; b < n; ++b) tree[leaves + b] = capacity;
    for (int64_t k = leaves - 1; k >= 1; --k) tree[k] = std::max(tree[2 * k], tree[2 * k + 1]);
    for (int64_t item : order) {
      int64_t k = 1;
      while (k < leaves) k = tree[2 * k] >= len[item] ? 2 * k : 2 * k + 1;
      bin_of[item] = k - leaves;
      tree[k] -= len[item];
      for (k >>= 1; k >= 1; k >>= 1) tree[k] = std::max(tree[2 * k], tree[2 * k + 1]);
    }
  }
  return out;
}

}  // namespace

void register_dataset_ops(py::module_& m) {
  m.def("build_document_index", &build_document_index, py::arg("documents"), py::arg("num_epochs"),
        py::arg("seed"), py::arg("separate_final_epoch"),
        "documents tiled num_epochs times and shuffled -> int32 [n * num_epochs]");
  m.def("build_sample_index", &build_sample_index, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"), py::arg("num_samples"),
        "(document index position, offset) of every sample boundary -> int64 [num_samples + 1, 2]");
  m.def("build_shuffle_index", &build_shuffle_index, py::arg("num_samples"), py::arg("total_size"),
        py::arg("seed"), "shuffled sample order -> int64 [total_size]");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "greedy blend -> (dataset index int16 [size], sample index within dataset int64 [size])");
  m.def("ffd_pack", &ffd_pack, py::arg("lengths"), py::arg("capacity"),
        "first-fit-decreasing bin of every item -> int64 [n]");
}

// One Python module, megatron_lite._C, assembled from the op families in csrc/.
// Each family registers its functions in its own translation unit.
#include <torch/extension.h>

#include "registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_lite compiled ops: packed sequences, MoE routing, dataset index builders";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  register_packed_seq_ops(m);
  register_moe_ops(m);
  register_dataset_ops(m);
}

"""megatron_lite: Megatron-style 3D-parallel pretraining for Mistral and Mixtral."""

# torch is imported first so its shared libraries (libc10, libtorch) are loaded before the
# compiled extension megatron_lite._C, which links against them, is imported.
import torch  # noqa: F401

__version__ = "0.1.0"

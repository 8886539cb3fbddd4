"""Build megatron_lite and its compiled extension ``megatron_lite._C``.

The extension is built from every ``csrc/*.cpp`` file. When the installed torch
has CUDA and a CUDA toolkit is found, ``csrc/cuda/*.cu`` is compiled as well and
``WITH_CUDA`` is defined so the C++ dispatchers route CUDA tensors to the kernels.

Install with ``pip install --no-build-isolation -e .`` so the build uses the
torch that is already installed (build isolation would fetch another one).
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - a clear message beats a setuptools traceback
    raise SystemExit(
        "megatron_lite needs torch installed before it is built: "
        "pip install torch, then pip install --no-build-isolation -e ."
    ) from exc


def _want_cuda() -> bool:
    """CUDA kernels are built when torch has CUDA and a toolkit is present (override: ML_FORCE_CPU=1)."""
    if os.environ.get("ML_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20"]
    if _want_cuda():
        cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        return CUDAExtension(
            "megatron_lite._C",
            cpp_sources + cu_sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    return CppExtension(
        "megatron_lite._C",
        cpp_sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
    )


setup(
    name="megatron_lite",
    version="0.1.0",
    description="Megatron-style 3D-parallel pretraining for Mistral and Mixtral",
    packages=find_packages(include=["megatron_lite", "megatron_lite.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "sentencepiece", "pybind11", "pyyaml", "safetensors"],
    extras_require={
        "test": ["pytest", "transformers", "ruff", "mistral-common", "matplotlib", "megatron-core"],
        "wandb": ["wandb"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

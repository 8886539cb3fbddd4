"""Build megatron_lite and its compiled extension ``megatron_lite._C``.

The extension is built from every ``csrc/*.cpp`` file. When the installed torch has CUDA and nvcc
is found, ``csrc/cuda/*.cu`` is compiled as well (on a ROCm torch with a ROCm toolkit, torch's
hipify turns them into HIP first) and ``WITH_CUDA`` is defined so the C++ dispatchers route GPU
tensors to the kernels. The decisions (which kernels, which GPU archs, which flags) live in
``csrc/build_config.py``; each prints one line when it is not the obvious one.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch that is already
installed (build isolation would hide it); ``tools/setup_env.sh`` does that and skips the rebuild
when nothing changed.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
import build_config  # noqa: E402  (csrc/build_config.py: the build decisions, unit-tested)

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, ROCM_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - a clear message beats a setuptools traceback
    raise SystemExit(build_config.isolation_message(sys.path)) from None

# torch 2.6: torch.load's weights_only default (checkpoints rely on it), FlexAttention block masks
# with mask_mod over index tensors, SDPA enable_gqa, selective checkpoint policies.
TORCH_REQUIREMENT = "torch>=2.6"


def _nvcc() -> str | None:
    path = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    return path if path and os.path.exists(path) else None


def _gpu_capabilities() -> list[tuple[int, int]]:
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def _set_arch_list(kind: str) -> None:
    """Sets TORCH_CUDA_ARCH_LIST / PYTORCH_ROCM_ARCH for torch's builder (its own choice fails
    with an IndexError on a login node without a GPU)."""
    try:
        if kind == "cuda":
            supported = build_config.nvcc_supported_archs(_nvcc())
            value, note = build_config.choose_cuda_arch_list(
                os.environ.get("TORCH_CUDA_ARCH_LIST"), _gpu_capabilities(), supported
            )
            var = "TORCH_CUDA_ARCH_LIST"
        else:
            value, note = build_config.choose_rocm_arch_list(
                os.environ.get("PYTORCH_ROCM_ARCH"), torch.cuda.is_available()
            )
            var = "PYTORCH_ROCM_ARCH"
    except build_config.BuildConfigError as exc:
        raise SystemExit(f"{build_config.TAG} {exc}") from None
    if value:
        os.environ[var] = value
    if note:
        print(note, flush=True)


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cpp_sources = [s for s in cpp_sources if "_hip." not in s]  # hipify's copies from a ROCm build
    kind, warning = build_config.extension_kind(
        torch.version.cuda,
        getattr(torch.version, "hip", None),
        _nvcc(),
        ROCM_HOME,
        os.environ.get("ML_FORCE_CPU", "0") == "1",
    )
    if warning:
        print(warning, flush=True)
    args = build_config.device_compile_args(kind)
    if kind == "cpu":
        return CppExtension(
            "megatron_lite._C",
            cpp_sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args=args,
        )
    _set_arch_list(kind)
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return CUDAExtension(
        "megatron_lite._C",
        cpp_sources + cu_sources,
        include_dirs=[os.path.join(here, "csrc")],
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args=args,
    )


setup(
    name="megatron_lite",
    version="0.1.0",
    description="Megatron-style 3D-parallel pretraining for Mistral and Mixtral",
    packages=find_packages(include=["megatron_lite", "megatron_lite.*"]),
    python_requires=">=3.10",
    install_requires=[TORCH_REQUIREMENT, "numpy", "sentencepiece", "pybind11", "pyyaml", "safetensors"],
    extras_require={
        "test": [
            "pytest",
            # A hung test fails after pyproject's `timeout` instead of stalling the suite.
            "pytest-timeout",
            "transformers",
            "ruff",
            "mistral-common",
            "matplotlib",
            "megatron-core",
            # The Triton grouped GEMM is tested on CPU under TRITON_INTERPRET=1 (a 16 s install).
            "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
        "wandb": ["wandb"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

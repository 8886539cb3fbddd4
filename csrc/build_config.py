"""Build decisions for ``megatron_lite._C``, kept apart from setup.py so tests can call them.

setup.py asks this module which extension to build (C++ only, CUDA or ROCm), for which GPU
architectures, with which device-compiler flags; tools/setup_env.sh asks it for the source
stamp that decides whether a rebuild is needed. Nothing here imports torch: callers pass in
what they know about it, so every decision is a plain function of its inputs.

    python3 csrc/build_config.py stamp     # prints the stamp of the current sources and torch
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

# Login nodes have nvcc but no GPU: build for the GPUs this project targets (A100 = sm80,
# H100/H200 = sm90), with PTX so newer GPUs can JIT the sm90 code.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
DEFAULT_ROCM_ARCHS = "gfx90a;gfx942"  # MI200 (MI250X) and MI300
MIN_CAPABILITY = (7, 0)  # the kernels use sync warp shuffles and 64-bit atomics on shared memory
TAG = "[megatron_lite build]"


class BuildConfigError(Exception):
    """A build setting that cannot work; the message is one line naming the setting and the fix."""


def parse_arch_list(value: str) -> list[str]:
    """``"8.0;9.0+PTX"`` or ``"8.0 9.0"`` -> ``["8.0", "9.0"]`` (named archs like ``Ampere`` kept)."""
    return [a.replace("+PTX", "") for a in re.split(r"[;\s]+", value.strip()) if a]


def nvcc_supported_archs(nvcc: str) -> set[str] | None:
    """Compute capabilities the given nvcc can target (``{"8.0", "9.0", "9.0a", ...}``), or None.

    Uses ``nvcc --list-gpu-arch`` (CUDA 11.0+); None when nvcc cannot be run or lacks the flag.
    """
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = set()
    for m in re.finditer(r"compute_(\d+)(\d)([a-z]?)\b", out):
        archs.add(f"{m.group(1)}.{m.group(2)}{m.group(3)}")
    return archs or None


def choose_cuda_arch_list(
    env_value: str | None, capabilities: list[tuple[int, int]], supported: set[str] | None
) -> tuple[str | None, str | None]:
    """Which ``TORCH_CUDA_ARCH_LIST`` to build with.

    Args:
        env_value: the user's ``TORCH_CUDA_ARCH_LIST`` (None or empty when unset); it wins.
        capabilities: compute capabilities of the visible GPUs (empty on a login node).
        supported: archs the local nvcc can target (None when unknown: no check).

    Returns:
        ``(value to set, note to print)``; ``(None, None)`` lets torch build for the visible GPUs.

    Raises:
        BuildConfigError: an arch the local nvcc cannot target, or a GPU older than sm70.
    """
    if env_value:
        known = {a for a in parse_arch_list(env_value) if re.fullmatch(r"\d+\.\d+[a-z]?", a)}
        # nvcc lists base archs only; 9.0a / 10.0f variants build wherever their base does
        bad = sorted(a for a in known if re.sub(r"[a-z]$", "", a) not in supported) if supported else []
        if bad:
            raise BuildConfigError(
                f"TORCH_CUDA_ARCH_LIST={env_value!r}: the local nvcc cannot target {', '.join(bad)} "
                f"(it targets {', '.join(sorted(supported, key=_arch_key))}); "
                "drop those or use a newer CUDA toolkit"
            )
        return env_value, None
    for i, cap in enumerate(capabilities):
        if tuple(cap) < MIN_CAPABILITY:
            raise BuildConfigError(
                f"GPU {i} has compute capability {cap[0]}.{cap[1]}; megatron_lite's CUDA kernels need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+: build the C++ ops only with ML_FORCE_CPU=1 "
                "or set TORCH_CUDA_ARCH_LIST for the GPUs you will run on"
            )
    if capabilities:
        return None, None
    archs = [a for a in parse_arch_list(DEFAULT_CUDA_ARCHS) if supported is None or a in supported]
    if not archs:
        raise BuildConfigError(
            "TORCH_CUDA_ARCH_LIST is unset, no GPU is visible and the local nvcc targets neither "
            "8.0 nor 9.0: set TORCH_CUDA_ARCH_LIST to the GPUs you will run on"
        )
    value = ";".join(archs[:-1] + [archs[-1] + "+PTX"])
    note = (
        f"{TAG} TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: building the CUDA kernels for "
        f"A100/H100 ({value}); set TORCH_CUDA_ARCH_LIST to choose others"
    )
    return value, note


def _arch_key(arch: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)", arch)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else (0, 0, arch)


def choose_rocm_arch_list(env_value: str | None, gpu_visible: bool) -> tuple[str | None, str | None]:
    """``PYTORCH_ROCM_ARCH`` to build with: the user's, the visible GPUs' (None), or MI200 + MI300."""
    if env_value or gpu_visible:
        return env_value or None, None
    note = (
        f"{TAG} PYTORCH_ROCM_ARCH is unset and no GPU is visible: building the HIP kernels for "
        f"MI200/MI300 ({DEFAULT_ROCM_ARCHS}); set PYTORCH_ROCM_ARCH to choose others"
    )
    return DEFAULT_ROCM_ARCHS, note


def extension_kind(
    torch_cuda: str | None, torch_hip: str | None, nvcc: str | None, rocm_home: str | None, force_cpu: bool
) -> tuple[str, str | None]:
    """``("cpu" | "cuda" | "rocm", warning or None)``: which kernels the installed torch and tools allow."""
    if force_cpu:
        return "cpu", None
    if torch_hip is not None:
        if rocm_home:
            return "rocm", None
        return "cpu", (
            f"{TAG} warning: torch is a ROCm {torch_hip} build but no ROCm toolkit was found: building the "
            "C++ ops only (GPU ops use the torch reference); set ROCM_HOME to build the HIP kernels"
        )
    if torch_cuda is not None:
        if nvcc:
            return "cuda", None
        return "cpu", (
            f"{TAG} warning: torch has CUDA {torch_cuda} but nvcc was not found: building the C++ ops only "
            "(GPU ops use the torch reference); install the CUDA toolkit or set CUDA_HOME to build "
            "the kernels"
        )
    return "cpu", None


def device_compile_args(kind: str) -> dict[str, list[str]]:
    """Compiler flags per compiler. The C++ standard is left to torch's BuildExtension, which adds
    the one its headers need (C++17 up to torch 2.9, C++20 from 2.10); passing our own would clash."""
    cxx = ["-O3"]
    if kind == "cuda":
        return {"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}
    if kind == "rocm":  # hipcc reads the "nvcc" entry; nvcc-only flags would break it
        warp_sync = "-DHIP_ENABLE_WARP_SYNC_BUILTINS"  # HIP's __shfl_*_sync / __syncwarp (ROCm 6.2+)
        return {"cxx": cxx + [warp_sync], "nvcc": ["-O3", "-ffast-math", warp_sync]}
    return {"cxx": cxx}


def source_files(root: Path) -> list[Path]:
    """The inputs of the build: setup.py and csrc/ (without hipify's generated copies)."""
    files = [root / "setup.py"]
    for p in sorted((root / "csrc").rglob("*")):
        rel = p.relative_to(root / "csrc")
        generated = rel.parts[0] == "hip" or "_hip." in p.name or "__pycache__" in rel.parts
        if p.is_file() and not generated:
            files.append(p)
    return files


def source_stamp(root: Path, torch_version: str, arch_env: str = "") -> str:
    """Hash of the build's inputs: sources, setup.py, the torch version and the chosen arch lists."""
    h = hashlib.sha256(f"torch={torch_version}\narch={arch_env}\n".encode())
    for p in source_files(root):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def isolation_message(sys_path: list[str]) -> str:
    """One line explaining a build that cannot import torch, naming build isolation when it is the cause."""
    if any("pip-build-env" in p or "build-env-" in p for p in sys_path):
        return (
            f"{TAG} torch is not importable because pip builds in an isolated environment (build isolation): "
            "megatron_lite must build against your installed torch, so run "
            "`pip install --no-build-isolation -e .`"
        )
    return (
        f"{TAG} torch is not importable: install torch first, then `pip install --no-build-isolation -e .` "
        "(without --no-build-isolation, pip's build isolation hides the installed torch)"
    )


def _main(argv: list[str]) -> int:
    if argv[1:] != ["stamp"]:
        print("usage: python3 csrc/build_config.py stamp", file=sys.stderr)
        return 2
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed distribution's version, without the seconds an `import torch` takes
        torch_version = version("torch")
    except PackageNotFoundError:
        print("torch is not installed", file=sys.stderr)
        return 1
    keys = ("TORCH_CUDA_ARCH_LIST", "PYTORCH_ROCM_ARCH", "ML_FORCE_CPU")
    arch_env = "|".join(os.environ.get(k, "") for k in keys)
    print(source_stamp(Path(__file__).resolve().parents[1], torch_version, arch_env))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))

"""ROCm readiness without a HIP compiler: torch's hipify over csrc/, then a scan for 32-lane assumptions.

What this proves: the hipified sources (what a ROCm torch's BuildExtension compiles) keep no
32-bit lane masks, no hard-coded 32-lane warps and no sync builtin called without the 64-bit mask.
What it cannot prove: that hipcc compiles them and that the kernels are right on a 64-lane
wavefront (see benchmarks/RESULTS.md, "ROCm").
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
hipify_python = pytest.importorskip("torch.utils.hipify.hipify_python")


def rocm_view(text: str) -> str:
    """The source as a ROCm compile sees it: keep the ROCm side of ``#if defined(USE_ROCM)`` blocks."""
    out, stack = [], []  # stack of (is_rocm_guard, keep_current_branch)
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#if"):
            rocm = "USE_ROCM" in s or "__HIP_PLATFORM_AMD__" in s
            stack.append((rocm, True))
            if rocm:
                continue
        elif s.startswith("#else") and stack and stack[-1][0]:
            stack[-1] = (True, False)
            continue
        elif s.startswith("#endif") and stack:
            if stack.pop()[0]:
                continue
        if all(keep for _, keep in stack):
            out.append(line)
    return "\n".join(out)


SYNC_CALL = re.compile(r"__(shfl\w*_sync|ballot_sync|any_sync|all_sync|syncwarp|match_\w+_sync)\s*\(([^,)]*)")


def wave64_problems(text: str) -> list[str]:
    """Lines of ROCm-side source that assume 32-lane warps or 32-bit lane masks."""
    problems = []
    code = rocm_view(text)
    for n, line in enumerate(code.splitlines(), 1):
        line = line.split("//")[0]
        if re.search(r"0x[fF]{8}[uU]?\b", line) or re.search(r"\bkWarp\s*=\s*32\b", line):
            problems.append(f"{n}: {line.strip()}")
        if re.search(r"\b(warpSize|kWarp)\s*==\s*32\b", line):
            problems.append(f"{n}: {line.strip()}")
        for m in SYNC_CALL.finditer(line):
            if m.group(2).strip() != "kFullMask":
                problems.append(f"{n}: {m.group(0)} (mask must be the 64-bit kFullMask)")
    return problems


@pytest.fixture(scope="module")
def hipified(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("hip")
    shutil.copytree(
        ROOT / "csrc", out / "csrc", ignore=shutil.ignore_patterns("hip", "*_hip.*", "__pycache__")
    )
    hipify_python.hipify(
        project_directory=str(out),
        output_directory=str(out),
        includes=[str(out / "csrc" / "*")],
        show_detailed=False,
        is_pytorch_extension=True,
    )
    return {str(p.relative_to(out)): p.read_text() for p in (out / "csrc" / "hip").iterdir()}


def test_hipify_produces_every_kernel(hipified):
    kernels = {p.stem for p in (ROOT / "csrc" / "cuda").glob("*.cu")}
    assert kernels and {Path(k).stem for k in hipified if k.endswith(".hip")} == kernels
    for name, text in hipified.items():
        assert "cuda_runtime" not in text and "cudaStream_t" not in text, name


def test_hipified_kernels_make_no_32_lane_assumptions(hipified):
    problems = {name: p for name, text in hipified.items() if (p := wave64_problems(text))}
    assert not problems, problems
    common = rocm_view(hipified["csrc/hip/common.cuh"])
    assert "using LaneMask = unsigned long long;" in common  # HIP's sync builtins take 64-bit masks
    assert "kWarp = __AMDGCN_WAVEFRONT_SIZE" in common and "kWarp = 64" in common


def test_the_scan_catches_what_it_looks_for():
    bad = "constexpr int kWarp = 32;\nfloat v = __shfl_xor_sync(0xffffffff, x, 1);\n__syncwarp();\n"
    assert len(wave64_problems(bad)) == 4
    assert wave64_problems("constexpr unsigned kFullMask = 0xffffffffu;")  # the mask this project had
    guarded = "#if defined(USE_ROCM)\nconstexpr int kWarp = 64;\n#else\nconstexpr int kWarp = 32;\n#endif\n"
    assert wave64_problems(guarded) == [] and "kWarp = 64" in rocm_view(guarded)

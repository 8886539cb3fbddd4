"""Build decisions (csrc/build_config.py), setup.py's message under build isolation, setup_env.sh's skip."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_config", ROOT / "csrc" / "build_config.py")
bc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bc)


def test_login_node_without_gpu_builds_for_a100_and_h100_and_says_so():
    value, note = bc.choose_cuda_arch_list(None, [], None)
    assert value == "8.0;9.0+PTX"
    assert "no GPU is visible" in note and "8.0;9.0+PTX" in note and "TORCH_CUDA_ARCH_LIST" in note
    # an older toolkit without sm90 keeps what it can target, with PTX on the newest
    assert bc.choose_cuda_arch_list("", [], {"7.0", "7.5", "8.0", "8.6"})[0] == "8.0+PTX"


def test_arch_list_env_overrides_and_visible_gpus_are_left_to_torch():
    assert bc.choose_cuda_arch_list("8.6", [], {"8.0", "8.6", "9.0"}) == ("8.6", None)
    assert bc.choose_cuda_arch_list("8.0;9.0a", [], {"8.0", "9.0"}) == ("8.0;9.0a", None)
    assert bc.choose_cuda_arch_list(None, [(8, 0), (8, 0)], None) == (None, None)


def test_arch_the_local_nvcc_cannot_target_is_one_line_naming_the_variable():
    with pytest.raises(bc.BuildConfigError) as err:
        bc.choose_cuda_arch_list("8.0;10.0+PTX", [], {"7.5", "8.0", "9.0"})
    msg = str(err.value)
    assert "\n" not in msg and "TORCH_CUDA_ARCH_LIST" in msg and "cannot target 10.0" in msg


def test_unsupported_gpu_is_one_line_naming_what_to_do():
    with pytest.raises(bc.BuildConfigError, match=r"GPU 1 has compute capability 6\.1.*ML_FORCE_CPU=1"):
        bc.choose_cuda_arch_list(None, [(8, 0), (6, 1)], None)


def test_nvcc_arch_listing_is_parsed(tmp_path):
    fake = tmp_path / "nvcc"
    listing = "\\n".join(["compute_75", "compute_80", "compute_90", "compute_90a", "compute_100"])
    fake.write_text(f"#!/bin/sh\nprintf '{listing}\\n'\n")
    fake.chmod(0o755)
    assert bc.nvcc_supported_archs(str(fake)) == {"7.5", "8.0", "9.0", "9.0a", "10.0"}
    assert bc.nvcc_supported_archs(str(tmp_path / "missing")) is None


def test_rocm_default_archs_when_no_gpu_is_visible():
    value, note = bc.choose_rocm_arch_list(None, gpu_visible=False)
    assert value == "gfx90a;gfx942" and "PYTORCH_ROCM_ARCH" in note
    assert bc.choose_rocm_arch_list("gfx90a", gpu_visible=False) == ("gfx90a", None)
    assert bc.choose_rocm_arch_list(None, gpu_visible=True) == (None, None)


def test_extension_kind_and_flags():
    kind, warning = bc.extension_kind("13.0", None, None, None, force_cpu=False)
    assert kind == "cpu" and "nvcc was not found" in warning and "\n" not in warning
    assert bc.extension_kind("13.0", None, "/usr/local/cuda/bin/nvcc", None, False) == ("cuda", None)
    kind, warning = bc.extension_kind(None, "6.4", None, None, False)
    assert kind == "cpu" and "ROCm" in warning
    assert bc.extension_kind(None, "6.4", None, "/opt/rocm", False) == ("rocm", None)
    assert bc.extension_kind("13.0", None, "/x/nvcc", None, force_cpu=True) == ("cpu", None)
    rocm = bc.device_compile_args("rocm")
    assert "-DHIP_ENABLE_WARP_SYNC_BUILTINS" in rocm["nvcc"]
    assert not {"--use_fast_math", "-lineinfo"} & set(rocm["nvcc"])  # nvcc-only flags break hipcc
    flags = [
        f for kind in ("cpu", "cuda", "rocm") for fs in bc.device_compile_args(kind).values() for f in fs
    ]
    assert not any(f.startswith("-std=") for f in flags)  # torch adds the standard its headers need


def test_stamp_follows_sources_and_torch_but_not_generated_hip_files(tmp_path):
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "setup.py").write_text("setup()")
    (tmp_path / "csrc" / "a.cpp").write_text("int a;")
    (tmp_path / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() {}")
    base = bc.source_stamp(tmp_path, "2.13.0")
    assert bc.source_stamp(tmp_path, "2.13.0") == base
    (tmp_path / "csrc" / "hip").mkdir()
    (tmp_path / "csrc" / "hip" / "k.hip").write_text("generated")
    (tmp_path / "csrc" / "a_hip.cpp").write_text("generated")
    assert bc.source_stamp(tmp_path, "2.13.0") == base
    assert bc.source_stamp(tmp_path, "2.14.1") != base
    assert bc.source_stamp(tmp_path, "2.13.0", arch_env="9.0") != base
    (tmp_path / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() { }")
    assert bc.source_stamp(tmp_path, "2.13.0") != base


def test_setup_py_under_build_isolation_names_it():
    code = (
        "import sys; sys.path.insert(0, '/tmp/pip-build-env-abc/overlay'); sys.modules['torch'] = None; "
        "sys.argv = ['setup.py', '--version']; exec(compile(open('setup.py').read(), 'setup.py', 'exec'), "
        "{'__file__': 'setup.py', '__name__': '__main__'})"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "build isolation" in last and "--no-build-isolation" in last


@pytest.mark.slow
def test_setup_env_rerun_does_not_rebuild_when_nothing_changed():
    try:
        importlib.metadata.distribution("megatron_lite")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("megatron_lite is not pip-installed here (setup_env.sh has not run on this machine)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stamp_file = ROOT / "megatron_lite" / ".build_stamp"
    old = stamp_file.read_text() if stamp_file.exists() else None
    want = subprocess.run(
        [sys.executable, str(ROOT / "csrc" / "build_config.py"), "stamp"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        stamp_file.write_text(want + "\n")
        proc = subprocess.run(
            ["bash", str(ROOT / "tools" / "setup_env.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        if old is None:
            stamp_file.unlink()
        else:
            stamp_file.write_text(old)
    assert proc.returncode == 0, proc.stderr
    assert "not rebuilding" in proc.stdout and "building megatron_lite" not in proc.stdout

"""GPU-only options on machines that cannot serve them: one line naming the option and the fix."""

from __future__ import annotations

import pytest

from megatron_lite.config import Config, ConfigError
from megatron_lite.training.device_checks import GpuInfo, check_device_options

NO_GPU = GpuInfo(count=0)
A100 = GpuInfo(count=8, capability=(8, 0), name="NVIDIA A100-SXM4-80GB")
V100 = GpuInfo(count=8, capability=(7, 0), name="Tesla V100")
P100 = GpuInfo(count=1, capability=(6, 0), name="Tesla P100")
MI250X = GpuInfo(count=8, capability=(9, 0), name="AMD Instinct MI250X", hip=True)


def cfg(**training) -> Config:
    c = Config()
    c.data.mock = True
    for k, v in training.items():
        setattr(c.training, k, v)
    return c.validate()


def one_line_error(config, gpu, local_rank=0) -> str:
    with pytest.raises(ConfigError) as err:
        check_device_options(config, gpu, local_rank)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_cuda_device_on_a_cpu_machine():
    msg = one_line_error(cfg(device="cuda"), NO_GPU)
    assert msg.startswith("training.device is 'cuda'") and "training.device: auto or cpu" in msg


def test_flash_attention_with_fp32():
    msg = one_line_error(cfg(attention_backend="flash", precision="fp32"), A100)
    assert "training.attention_backend 'flash'" in msg and "training.precision: bf16" in msg


def test_more_processes_than_gpus():
    msg = one_line_error(cfg(), A100, local_rank=8)
    assert "LOCAL_RANK 8" in msg and "--nproc-per-node" in msg


def test_unsupported_gpu_and_bf16_on_volta():
    assert "compute capability 6.0) is not supported" in one_line_error(cfg(), P100)
    msg = one_line_error(cfg(precision="auto"), V100)  # auto means bf16 on a GPU
    assert "training.precision bf16 needs compute capability 8.0+" in msg and "fp16" in msg
    check_device_options(cfg(precision="fp16"), V100, 0)


def test_supported_setups_pass():
    check_device_options(cfg(), NO_GPU, 0)  # auto on CPU: fp32 on the CPU
    check_device_options(cfg(device="cuda", precision="bf16"), A100, 7)
    check_device_options(cfg(precision="bf16"), MI250X, 0)

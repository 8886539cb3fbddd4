"""Pretrain a Mistral/Mixtral model.

Usage::

    python -m megatron_lite.pretrain --config FILE [--section.field value ...]
    python -m megatron_lite.pretrain --tensor-model-parallel-size 2 --num-layers 32 ...  (Megatron-LM names)
    torchrun --nproc-per-node N -m megatron_lite.pretrain --config FILE --parallel.tensor T ...

Exit status: 0 done, 2 configuration error (one ``config error: ...`` line, printed before any
process group or tensor exists), 1 checkpoint or data error (one ``checkpoint error: ...`` or
``data error: ...`` line naming the file).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from megatron_lite.config import ConfigError, main_argv_to_config
from megatron_lite.data.indexed_dataset import DatasetError
from megatron_lite.training.checkpoint import CheckpointError
from megatron_lite.training.runtime import check_run_config, env_world_size, init_runtime, shutdown
from megatron_lite.training.setup import setup_training
from megatron_lite.training.signals import ExitSignal


def main(argv: list[str] | None = None) -> int:
    """Run pretraining from command-line arguments; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from megatron_lite.config_help import config_help

        print(__doc__)
        print(config_help())
        return 0
    try:
        cfg = main_argv_to_config(argv)
        check_run_config(cfg, env_world_size())
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        cfg.save(Path(cfg.logging.run_dir) / "config.yaml")
    runtime = init_runtime(cfg)
    exit_signal = ExitSignal().install() if cfg.training.exit_signal_handler else None
    try:
        trainer = setup_training(cfg, runtime, exit_signal=exit_signal)
        trainer.train()
        trainer.writers.close()
    except ConfigError as exc:  # found while building data (e.g. tokenizer larger than the vocabulary)
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, DatasetError) as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return 1
    finally:
        if exit_signal is not None:
            exit_signal.restore()
        shutdown(runtime)
    return 0


if __name__ == "__main__":
    sys.exit(main())

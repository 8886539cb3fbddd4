"""One script for a GPU hour: build, GPU test tier, NCCL, short training runs, benchmarks, host syncs.

Runs on a fresh machine with one GPU (torch preinstalled, no internet; flash-attn, TE and apex
absent) within ``--budget`` seconds (default 500, under 9 minutes) and writes under OUT_DIR:

    summary.json       one entry per step: status (ok / failed / timeout / skipped), seconds,
                       details parsed from the step (test counts, losses, speedups, sync counts)
    logs/<step>.log    the step's full output

Steps, in priority order (a step that would not fit in the remaining budget is skipped):
  env             torch/CUDA/GPU/triton/transformers/flash-attn versions
  build           megatron_lite._C for the local GPU arch (setup.py build_ext --inplace)
  gpu_tests       pytest -m gpu: every kernel face against its reference on the GPU
  nccl            NCCL collectives at world size 1 (torchrun, one process)
  train_mistral   20 bf16 training steps of a tiny Mistral (pretrain entry point, mock data)
  train_mixtral   the same for a tiny Mixtral
  host_syncs      device-to-host syncs per training step (torch.cuda.set_sync_debug_mode)
  moe_layer       bench_moe_layer.py: Mixtral 8x7B layer vs transformers' grouped_mm block
  train_bench     bench_train.py: ~1B Mistral vs transformers, same weights, interleaved

``--dry-run`` (CI, CPU) walks the same steps: checks every script and config a step needs and
that its arguments are accepted (the training configs resolve, the benchmarks parse their flags,
the sync counter finds the functions it calls), records the command, and reports the GPU steps as
skipped.

    python benchmarks/gpu_check.py OUT_DIR [--dry-run] [--budget SECONDS] [--only STEP ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = "examples/configs/quickstart_tiny_mistral.yaml"
TRAIN_ARGS = [
    "-m", "megatron_lite.pretrain", "--config", TINY, "--data.mock", "true", "--training.train_iters", "20",
    "--training.precision", "bf16", "--training.device", "cuda", "--optimizer.lr_warmup_iters", "2",
    "--logging.log_interval", "1", "--training.micro_batch_size", "4", "--training.global_batch_size", "4",
]  # fmt: skip
MIXTRAL_ARGS = ["--model.arch", "mixtral", "--model.num_experts", "4", "--model.top_k", "2"]


@dataclass
class Step:
    """One check: a command, the files it needs, how long it may take, how to read its output."""

    name: str
    cmd: list[str]
    needs: list[str] = field(default_factory=list)
    timeout: int = 120
    gpu: bool = True
    parse: str = ""  # name of a parser in PARSERS


@dataclass
class Result:
    """What summary.json records for one step."""

    name: str
    status: str
    seconds: float = 0.0
    command: str = ""
    log: str = ""
    details: dict = field(default_factory=dict)


def steps(out: Path) -> list[Step]:
    """The checks in priority order."""
    bench = "benchmarks"
    return [
        Step("env", [PY, __file__, "--print-env"], gpu=False, timeout=60, parse="json_tail"),
        Step("build", [PY, "setup.py", "build_ext", "--inplace"], ["setup.py", "csrc/build_config.py"], 240),
        Step(
            "gpu_tests",
            [PY, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"],
            [],
            150,
            parse="pytest",
        ),  # fmt: skip
        Step(
            "nccl",
            [PY, "-m", "torch.distributed.run", "--nproc-per-node", "1", __file__, "--nccl-probe"],
            timeout=60,
            parse="json_tail",
        ),  # fmt: skip
        Step(
            "train_mistral",
            [PY, *TRAIN_ARGS, "--logging.run_dir", str(out / "run_mistral")],
            [TINY],
            90,
            parse="losses",
        ),  # fmt: skip
        Step(
            "train_mixtral",
            [PY, *TRAIN_ARGS, *MIXTRAL_ARGS, "--logging.run_dir", str(out / "run_mixtral")],
            [TINY],
            90,
            parse="losses",
        ),  # fmt: skip
        Step("host_syncs", [PY, __file__, "--count-syncs"], timeout=90, parse="json_tail"),
        Step(
            "moe_layer",
            [PY, f"{bench}/bench_moe_layer.py", "--iters", "10", "--json", str(out / "moe_layer.json")],
            [f"{bench}/bench_moe_layer.py"],
            90,
            parse="moe_json",
        ),  # fmt: skip
        Step(
            "train_bench",
            [
                PY,
                f"{bench}/bench_train.py",
                "--warmup",
                "2",
                "--iters",
                "5",
                "--json",
                str(out / "train_bench.json"),
            ],
            [f"{bench}/bench_train.py"],
            240,
            parse="train_json",
        ),  # fmt: skip
    ]


def parse_pytest(text: str, out: Path) -> dict:
    counts = {
        k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)
    }
    return counts


def parse_losses(text: str, out: Path) -> dict:
    losses = [float(x) for x in re.findall(r"lm loss: ([0-9.E+-]+)", text)]
    return {
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def parse_json_tail(text: str, out: Path) -> dict:
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def parse_moe_json(text: str, out: Path) -> dict:
    r = json.loads((out / "moe_layer.json").read_text())
    return {
        k: r[k] for k in ("ours_ms", "transformers_ms", "speedup", "speedup_spread", "transformers_experts")
    }


def parse_train_json(text: str, out: Path) -> dict:
    r = json.loads((out / "train_bench.json").read_text())
    return {"results": r["results"], "speedup": r["speedup"]}


PARSERS = {
    "pytest": parse_pytest,
    "losses": parse_losses,
    "json_tail": parse_json_tail,
    "moe_json": parse_moe_json,
    "train_json": parse_train_json,
}


def run_step(step: Step, out: Path, remaining: float, dry_run: bool) -> Result:
    """Runs one step (or, in a dry run, checks what it needs) and records the outcome."""
    res = Result(step.name, "ok", command=" ".join(step.cmd), log=f"logs/{step.name}.log")
    missing = [p for p in step.needs if not (ROOT / p).exists()]
    if missing:
        res.status, res.details = "failed", {"missing": missing}
        return res
    if dry_run and step.gpu:
        try:
            dry_check(step)
        except (Exception, SystemExit) as exc:  # argparse exits; config errors raise
            res.status, res.details = "failed", {"dry_check": f"{type(exc).__name__}: {exc}"}
            return res
        res.status, res.details = "skipped", {"why": "dry run: GPU step (arguments checked)"}
        return res
    if step.timeout > remaining:
        res.status, res.details = (
            "skipped",
            {"why": f"needs up to {step.timeout}s, {remaining:.0f}s of budget left"},
        )
        return res
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    t0 = time.monotonic()
    with open(out / res.log, "w") as log:
        try:
            proc = subprocess.run(step.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=step.timeout)  # fmt: skip
            res.status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            res.status = "timeout"
    res.seconds = round(time.monotonic() - t0, 1)
    if step.parse:
        try:
            res.details = PARSERS[step.parse]((out / res.log).read_text(errors="replace"), out)
        except (OSError, ValueError, KeyError) as exc:
            res.details = {"parse_error": str(exc)}
    return res


def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def dry_check(step: Step) -> None:
    """What a dry run can check on CPU: the step's arguments are accepted by what it calls."""
    if "megatron_lite.pretrain" in step.cmd:
        from megatron_lite.config import main_argv_to_config

        cfg = main_argv_to_config(step.cmd[step.cmd.index("megatron_lite.pretrain") + 1 :])
        assert cfg.training.train_iters == 20 and cfg.training.precision == "bf16"
    elif any(a.endswith(".py") and "benchmarks/bench_" in a for a in step.cmd):
        script = next(a for a in step.cmd if a.endswith(".py"))
        _bench_module(Path(script).stem).parse_args(step.cmd[step.cmd.index(script) + 1 :])
    elif "--count-syncs" in step.cmd:
        bench = _bench_module("bench_train")
        for fn in ("parse_args", "model_config", "build_ours", "step_ours"):
            assert callable(getattr(bench, fn, None)), f"bench_train.{fn} is gone"
        bench.parse_args(["--tiny", "--precision", "bf16", "--mixtral"])


def print_env() -> int:
    """Prints the versions that decide which faces run, as one JSON line."""
    import importlib.metadata as md

    import torch

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
    }
    for pkg in ("triton", "transformers", "flash-attn", "transformer-engine", "apex"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
        info["gpus"] = torch.cuda.device_count()
    print(json.dumps(info))
    return 0


def nccl_probe() -> int:
    """Every collective the framework uses, over NCCL at world size 1; prints one JSON line."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    x = torch.arange(8, dtype=torch.bfloat16, device="cuda")
    ok = {}
    dist.all_reduce(y := x.clone())
    ok["all_reduce"] = torch.equal(y, x)
    out = torch.empty_like(x)
    dist.all_gather_into_tensor(out, x)
    ok["all_gather"] = torch.equal(out, x)
    dist.reduce_scatter_tensor(out, x)
    ok["reduce_scatter"] = torch.equal(out, x)
    dist.all_to_all_single(out, x)
    ok["all_to_all"] = torch.equal(out, x)
    dist.broadcast(y := x.clone(), 0)
    ok["broadcast"] = torch.equal(y, x)
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps(ok))
    return 0 if all(ok.values()) else 1


def count_syncs() -> int:
    """Device-to-host syncs in one bf16 training step of tiny Mistral and Mixtral (after warmup)."""
    import warnings

    import torch

    bench_train = _bench_module("bench_train")
    result = {}
    for arch in ("mistral", "mixtral"):
        args = bench_train.parse_args(
            ["--tiny", "--precision", "bf16"] + (["--mixtral"] if arch == "mixtral" else [])
        )
        cfg = bench_train.model_config(args)
        device = torch.device("cuda")
        tokens = torch.randint(0, cfg.vocab_size, (2, args.seq_length + 1), device=device)
        step = bench_train.step_ours(bench_train.build_ours(cfg, args, device), args, device, tokens)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()  # its float(loss) is one sync by design (the trainer logs the loss the same way)
            torch.cuda.set_sync_debug_mode("default")
        sites = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        result[arch] = {"syncs_per_step": len(sites), "sites": sorted(set(sites))}
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the steps and writes summary.json; exit status 1 when any step failed or timed out."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?")
    p.add_argument("--dry-run", action="store_true", help="CPU: check the steps, skip the GPU parts")
    p.add_argument("--budget", type=float, default=500.0, help="seconds for all steps together")
    p.add_argument("--only", nargs="*", help="run only these steps")
    for hidden in ("--print-env", "--nccl-probe", "--count-syncs"):
        p.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.print_env:
        return print_env()
    if args.nccl_probe:
        return nccl_probe()
    if args.count_syncs:
        return count_syncs()
    if not args.out_dir:
        p.error("OUT_DIR is required")
    out = Path(args.out_dir).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    results = []
    for step in steps(out):
        if args.only and step.name not in args.only:
            continue
        res = run_step(step, out, deadline - time.monotonic(), args.dry_run)
        results.append(res)
        details = json.dumps(res.details)[:160]
        print(f"[gpu_check] {res.name:<14} {res.status:<8} {res.seconds:6.1f}s  {details}", flush=True)
    summary = {"dry_run": args.dry_run, "budget_s": args.budget, "steps": [asdict(r) for r in results]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[gpu_check] summary: {out / 'summary.json'}")
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Simulate a pipeline schedule: step time, bubble, peak activations, timeline plot.

Examples::

    python tools/simulate_pipeline.py --schedule interleaved --pp 4 --vpp 2 --microbatches 8
    python tools/simulate_pipeline.py --schedule 1f1b --pp 4 --microbatches 8 --json
    python tools/simulate_pipeline.py --schedule breadth-first --pp 4 --vpp 2 --microbatches 8 \\
        --plot timeline.png
    python tools/simulate_pipeline.py --all --pp 4 --vpp 2 --microbatches 8

Times: ``--t-fwd``/``--t-bwd`` are for a whole stage (all of one rank's layers) and one
microbatch; with ``--vpp V`` each chunk takes 1/V of them. ``--t-comm`` is the transfer time of
every send -> receive.

Data-parallel communication (``--dp N`` with N > 1): each rank also runs its ZeRO collectives
on a separate stream (see ``megatron_lite/pipeline/dp_comm.py``); times are then in
milliseconds. ``--zero 3`` all-gathers a chunk's weights before each pass over it (prefetched
one pass ahead) and reduce-scatters its gradients after its last backward; ``--zero 1`` only
reduce-scatters, then all-gathers the updated weights after the step. A ring collective of
``B`` bytes takes ``(dp-1)/dp * B / bandwidth + (dp-1) * latency``::

    python tools/simulate_pipeline.py --schedule breadth-first --pp 8 --vpp 8 --microbatches 8 \
        --t-fwd 22 --t-bwd 44 --dp 16 --zero 3 --dp-bandwidth 25 --dp-latency 10 \
        --param-bytes-per-chunk 2.01e8
    # --dp-table: breadth-first vs interleaved with ZeRO-1 and ZeRO-3 for the given sizes
    python tools/simulate_pipeline.py --dp-table --pp 8 --vpp 8 --microbatches 8 --t-fwd 22 \
        --t-bwd 44 --dp 16 --dp-bandwidth 25 --dp-latency 10 --model-params 52e9 --num-layers 64 --tp 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Runnable as `python tools/simulate_pipeline.py` from a checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.pipeline.dp_comm import ZERO_STAGES, DataParallelComm  # noqa: E402
from megatron_lite.pipeline.plotting import matplotlib_available, plot_timeline  # noqa: E402
from megatron_lite.pipeline.schedules import (  # noqa: E402
    SCHEDULES,
    build_schedule,
    ideal_bubble_fraction,
)
from megatron_lite.pipeline.simulator import (  # noqa: E402
    MODES,
    PipelineDeadlock,
    ScheduleError,
    SimulationResult,
    simulate,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", choices=list(SCHEDULES), help="schedule to simulate")
    p.add_argument("--all", action="store_true", help="compare every schedule that accepts the sizes")
    p.add_argument("--pp", type=int, required=True, help="pipeline-parallel size")
    p.add_argument("--vpp", type=int, default=1, help="model chunks per rank (default 1)")
    p.add_argument("--microbatches", type=int, required=True, help="microbatches per step")
    p.add_argument(
        "--microbatch-group-size",
        type=int,
        default=None,
        help="interleaved only: microbatches per chunk before switching (default pp)",
    )
    p.add_argument("--t-fwd", type=float, default=1.0, help="forward time of one stage (default 1)")
    p.add_argument("--t-bwd", type=float, default=2.0, help="backward time of one stage (default 2)")
    p.add_argument("--t-comm", type=float, default=0.0, help="time of one send->recv (default 0)")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="async",
        help="executor model: async (default) or rendezvous (blocking sends)",
    )
    _add_dp_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="OUT.png", help="draw the timeline (needs matplotlib)")
    args = p.parse_args(argv)
    if not (args.all or args.dp_table) and args.schedule is None:
        p.error("give --schedule NAME, --all or --dp-table")
    if args.dp < 1:
        p.error(f"--dp ({args.dp}) must be >= 1")
    if args.dp > 1 and args.param_bytes_per_chunk is None and args.model_params is None:
        p.error("--dp > 1 needs --param-bytes-per-chunk or --model-params with --num-layers")
    if args.model_params is not None and args.num_layers is None:
        p.error("--model-params needs --num-layers (layers are split over pp * vpp chunks)")
    if args.dp_bandwidth <= 0:
        p.error(f"--dp-bandwidth ({args.dp_bandwidth}) must be > 0 (GB/s)")
    return args


def _add_dp_args(p: argparse.ArgumentParser) -> None:
    """Data-parallel communication flags."""
    g = p.add_argument_group("data-parallel communication (times in ms when --dp > 1)")
    g.add_argument("--dp", type=int, default=1, help="data-parallel size (default 1: no DP comm)")
    g.add_argument("--zero", type=int, choices=ZERO_STAGES, default=1, help="ZeRO stage: 1 or 3 (default 1)")
    g.add_argument(
        "--dp-bandwidth", type=float, default=25.0, help="per-rank DP bandwidth in GB/s (default 25)"
    )
    g.add_argument("--dp-latency", type=float, default=10.0, help="latency per ring step in us (default 10)")
    g.add_argument("--param-bytes-per-chunk", type=float, help="bytes of one chunk's weights on one rank")
    g.add_argument("--model-params", type=float, help="model parameters (derives the bytes per chunk)")
    g.add_argument("--num-layers", type=int, help="model layers (with --model-params)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size dividing a chunk (default 1)")
    g.add_argument("--bytes-per-param", type=float, default=2.0, help="gathered dtype size (default 2, bf16)")
    g.add_argument(
        "--no-overlap-reduce",
        action="store_true",
        help="reduce-scatter all gradients after the last backward (Megatron-LM without overlap_grad_reduce)",
    )
    g.add_argument("--t-optimizer", type=float, default=0.0, help="optimizer step time in ms (default 0)")
    g.add_argument(
        "--dp-table",
        action="store_true",
        help="markdown table: breadth-first vs interleaved with ZeRO-1 and ZeRO-3",
    )


def param_bytes_per_chunk(args: argparse.Namespace) -> float:
    """Bytes of one chunk's weights on one rank: given, or model params / (pp * vpp * tp).

    With ``--model-params`` the parameters are taken as spread evenly over the layers (the
    embedding and output layer are ignored: at 52B they are under 1 %).
    """
    if args.param_bytes_per_chunk is not None:
        return args.param_bytes_per_chunk
    per_layer = args.model_params / args.num_layers
    layers_per_chunk = args.num_layers / (args.pp * args.vpp)
    return per_layer * layers_per_chunk / args.tp * args.bytes_per_param


def dp_comm_from_args(args: argparse.Namespace, zero: int | None = None) -> DataParallelComm | None:
    """The DP comm model of the flags (times in ms); None when --dp is 1."""
    if args.dp == 1:
        return None
    return DataParallelComm(
        dp=args.dp,
        zero=args.zero if zero is None else zero,
        param_bytes_per_chunk=param_bytes_per_chunk(args),
        bandwidth=args.dp_bandwidth * 1e6,  # GB/s -> bytes per ms
        latency=args.dp_latency / 1e3,  # us -> ms
        t_optimizer=args.t_optimizer,
        overlap_reduce=not args.no_overlap_reduce,
    )


def run_one(name: str, args: argparse.Namespace) -> tuple[dict, SimulationResult]:
    """Build and simulate one schedule; returns its JSON-friendly summary and the result."""
    options = {}
    if name == "interleaved" and args.microbatch_group_size is not None:
        options["microbatch_group_size"] = args.microbatch_group_size
    schedule = build_schedule(name, args.pp, args.vpp, args.microbatches, **options)
    dp_comm = dp_comm_from_args(args)
    result = simulate(
        schedule, args.t_fwd, args.t_bwd, args.t_comm, vpp=args.vpp, mode=args.mode, dp_comm=dp_comm
    )
    summary = {
        "schedule": name,
        "pp": args.pp,
        "vpp": args.vpp,
        "microbatches": args.microbatches,
        "t_fwd": args.t_fwd,
        "t_bwd": args.t_bwd,
        "t_comm": args.t_comm,
        "mode": args.mode,
        "step_time": result.step_time,
        "bubble_fraction": result.bubble_fraction,
        "ideal_bubble_fraction": ideal_bubble_fraction(name, args.pp, args.vpp, args.microbatches),
        "peak_activations": result.peak_activations,
        "busy_time": result.busy_time,
    }
    if dp_comm is not None:
        summary["dp"] = {
            "dp": dp_comm.dp,
            "zero": dp_comm.zero,
            "all_gathers_per_rank": [sum(e.kind == "all_gather" for e in ev) for ev in result.dp_events],
            "t_all_gather": dp_comm.t_gather,
            "t_reduce_scatter": dp_comm.t_reduce,
            "compute_end": result.compute_end,
        }
    return summary, result


def format_report(s: dict) -> str:
    """Human-readable report of one summary."""
    ideal = s["ideal_bubble_fraction"]
    ideal_txt = "" if ideal is None else f"   (closed form for t_comm=0: {100 * ideal:.2f} %)"
    peaks = ", ".join(f"rank {r}: {n}" for r, n in enumerate(s["peak_activations"]))
    return "\n".join(
        [
            f"schedule {s['schedule']}: pp={s['pp']} vpp={s['vpp']} microbatches={s['microbatches']}  "
            f"t_fwd={s['t_fwd']:g} t_bwd={s['t_bwd']:g} t_comm={s['t_comm']:g} ({s['mode']})",
            f"  step time         {s['step_time']:g}",
            f"  bubble            {100 * s['bubble_fraction']:.2f} %{ideal_txt}",
            f"  peak activations  {peaks}  (microbatch-chunk activations held)",
        ]
        + _format_dp(s.get("dp"))
    )


def _format_dp(dp: dict | None) -> list[str]:
    if dp is None:
        return []
    return [
        f"  data parallel     dp={dp['dp']} ZeRO-{dp['zero']}: all-gather {dp['t_all_gather']:.3g}, "
        f"reduce-scatter {dp['t_reduce_scatter']:.3g} per chunk; "
        f"at most {max(dp['all_gathers_per_rank'])} all-gathers per rank; compute ends at "
        f"{max(dp['compute_end']):g}",
    ]


def dp_table(args: argparse.Namespace) -> str:
    """Markdown table: step time of breadth-first and interleaved with ZeRO-1 and ZeRO-3."""
    rows = ["| schedule | ZeRO-1 step | ZeRO-3 step | ZeRO-3 all-gathers per rank |", "|---|---|---|---|"]
    for name in ("breadth-first", "interleaved"):
        schedule = build_schedule(name, args.pp, args.vpp, args.microbatches)
        cells, gathers = [], 0
        for zero in ZERO_STAGES:
            r = simulate(
                schedule,
                args.t_fwd,
                args.t_bwd,
                args.t_comm,
                args.vpp,
                args.mode,
                dp_comm=dp_comm_from_args(args, zero),
            )
            cells.append(f"{r.step_time:.4g}")
            gathers = max((sum(e.kind == "all_gather" for e in ev) for ev in r.dp_events), default=0)
        rows.append(f"| {name} | {' | '.join(cells)} | {gathers} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    if args.dp_table:
        try:
            print(dp_table(args))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if args.plot and args.all:
        print("error: --plot draws one schedule; use --schedule NAME", file=sys.stderr)
        return 2
    if args.plot and not matplotlib_available():
        print("error: --plot needs matplotlib (not installed): pip install matplotlib", file=sys.stderr)
        return 2
    names = list(SCHEDULES) if args.all else [args.schedule]
    summaries, skipped, last = [], {}, None
    for name in names:
        try:
            summary, last = run_one(name, args)
        except (ValueError, PipelineDeadlock) as e:
            if not args.all or isinstance(e, (ScheduleError, PipelineDeadlock)):
                print(f"error: {e}", file=sys.stderr)
                return 1
            skipped[name] = str(e)  # this schedule does not accept these sizes
            continue
        summaries.append(summary)
    if args.json:
        out = {"schedules": summaries, "skipped": skipped} if args.all else summaries[0]
        print(json.dumps(out))
    else:
        print("\n\n".join(format_report(s) for s in summaries))
        for name, why in skipped.items():
            print(f"\nskipped {name}: {why}")
    if args.plot:
        title = f"{args.schedule} pp={args.pp} vpp={args.vpp} M={args.microbatches}"
        plot_timeline(last, args.plot, title=title)
        if not args.json:
            print(f"\ntimeline written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Runnable as `python tools/simulate_pipeline.py` from a checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="OUT.png", help="draw the timeline (needs matplotlib)")
    args = p.parse_args(argv)
    if not args.all and args.schedule is None:
        p.error("give --schedule NAME or --all")
    return args


def run_one(name: str, args: argparse.Namespace) -> tuple[dict, SimulationResult]:
    """Build and simulate one schedule; returns its JSON-friendly summary and the result."""
    options = {}
    if name == "interleaved" and args.microbatch_group_size is not None:
        options["microbatch_group_size"] = args.microbatch_group_size
    schedule = build_schedule(name, args.pp, args.vpp, args.microbatches, **options)
    result = simulate(schedule, args.t_fwd, args.t_bwd, args.t_comm, vpp=args.vpp, mode=args.mode)
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
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
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

"""Simulator's data-parallel comm model (ZeRO-1/3): closed forms on tiny cases (pure Python)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections import Counter

import pytest

from megatron_lite.pipeline.dp_comm import DataParallelComm, chunk_passes
from megatron_lite.pipeline.schedules import build_schedule
from megatron_lite.pipeline.simulator import simulate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("gpipe", 2, 1, 3),
    ("1f1b", 4, 1, 5),
    ("interleaved", 2, 2, 4),
    ("interleaved", 4, 2, 8),
    ("breadth-first", 2, 2, 3),
    ("breadth-first", 4, 2, 8),
]


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _comm(zero: int, t: float = 1.0, dp: int = 2, **kw) -> DataParallelComm:
    """dp=2 ring with bandwidth 1: a collective of 2 * t bytes takes t (no latency)."""
    return DataParallelComm(dp=dp, zero=zero, param_bytes_per_chunk=2 * t, bandwidth=1.0, **kw)


def _gathers(events) -> Counter:
    return Counter(e.chunk for e in events if e.kind == "all_gather")


def test_ring_cost_formula():
    c = DataParallelComm(
        dp=4, zero=3, param_bytes_per_chunk=8, grad_bytes_per_chunk=16, bandwidth=2, latency=0.5
    )
    assert c.t_gather == pytest.approx(3 / 4 * 8 / 2 + 3 * 0.5)
    assert c.t_reduce == pytest.approx(3 / 4 * 16 / 2 + 3 * 0.5)
    assert DataParallelComm(dp=1, zero=3, param_bytes_per_chunk=8, bandwidth=1, latency=5).t_gather == 0


@pytest.mark.parametrize("name, pp, vpp, m", CASES)
@pytest.mark.parametrize("zero", [1, 3])
@pytest.mark.parametrize("mode", ["async", "rendezvous"])
def test_free_comm_gives_todays_times_exactly(name, pp, vpp, m, zero, mode):
    schedule = build_schedule(name, pp, vpp, m)
    base = simulate(schedule, 1.0, 2.0, 0.1, mode=mode)
    free = DataParallelComm(dp=8, zero=zero, param_bytes_per_chunk=1e9, bandwidth=math.inf, latency=0.0)
    got = simulate(schedule, 1.0, 2.0, 0.1, mode=mode, dp_comm=free)
    assert got.step_time == base.step_time
    assert got.timelines == base.timelines


@pytest.mark.parametrize("name, pp, vpp, m", CASES)
def test_zero_compute_step_is_the_sum_of_collectives(name, pp, vpp, m):
    schedule = build_schedule(name, pp, vpp, m)
    for zero in (1, 3):
        r = simulate(schedule, 0.0, 0.0, 0.0, dp_comm=_comm(zero, t=1.0, t_optimizer=0.25))
        per_rank = [sum(e.kind != "optimizer" for e in ev) for ev in r.dp_events]
        assert r.step_time == pytest.approx(max(per_rank) + 0.25)
        if zero == 1:  # one reduce-scatter per chunk, then one all-gather per chunk
            assert per_rank == [2 * vpp] * pp


@pytest.mark.parametrize("pp, vpp, m", [(2, 2, 3), (4, 2, 8), (2, 4, 2)])
def test_breadth_first_gathers_each_chunk_twice(pp, vpp, m):
    r = simulate(build_schedule("breadth-first", pp, vpp, m), dp_comm=_comm(3))
    for events in r.dp_events:
        assert _gathers(events) == {c: 2 for c in range(vpp)}
        assert Counter(e.chunk for e in events if e.kind == "reduce_scatter") == {c: 1 for c in range(vpp)}


@pytest.mark.parametrize("pp, vpp, groups", [(2, 2, 1), (2, 2, 3), (4, 2, 2)])
def test_interleaved_gathers_each_chunk_twice_per_group(pp, vpp, groups):
    """Interleaved revisits every chunk once per group of pp microbatches, forward and backward."""
    r = simulate(build_schedule("interleaved", pp, vpp, groups * pp), dp_comm=_comm(3))
    for events in r.dp_events:
        assert _gathers(events) == {c: 2 * groups for c in range(vpp)}
    bigger = build_schedule("interleaved", 2, 2, 6, microbatch_group_size=3)
    assert len(chunk_passes(bigger[0])) == 2 * 2 * 2  # 2 groups of 3, 2 chunks, F and B


def test_compute_waits_for_an_unfinished_gather():
    """pp 2 x vpp 2, 1 microbatch, gathers and reduce-scatters of 3 (stage F 1, B 2 -> chunk 0.5, 1)."""
    r = simulate(build_schedule("breadth-first", 2, 2, 1), 1.0, 2.0, dp_comm=_comm(3, t=3.0))
    # Rank 1 (stages 1 and 3): gather c0 [0,3]; F(c0) waits for rank 0's activation until 3.5 and
    # issues c1's gather [3.5,6.5]; F(c1) at 6.5 issues B(c1)'s gather [6.5,9.5]; B(c1) waits for
    # it (its input is local: last stage) and issues B(c0)'s gather at 9.5 [9.5,12.5]; B(c0) waits
    # for it although its gradient came at 11.5. Reduce-scatters queue behind: [12.5,15.5], [15.5,18.5].
    assert [iv.start for iv in r.timelines[1]] == [3.5, 6.5, 9.5, 12.5]
    assert [(e.kind, e.chunk, e.end) for e in r.dp_events[1][-3:-1]] == [
        ("reduce_scatter", 1, 15.5),
        ("reduce_scatter", 0, 18.5),
    ]
    # Without the gathers the same rank ends at 5.0; rank 0 ends last (its B(c0) at 13.5-14.5).
    assert r.compute_end == [14.5, 13.5]
    assert r.step_time == 19.5


def test_hidden_comm_exposes_only_first_gather_and_last_reduce():
    """Enough compute per pass: ZeRO-3 step = first gather + today's step + last reduce-scatter."""
    schedule = build_schedule("breadth-first", 2, 2, 4)
    base = simulate(schedule, 2.0, 4.0).step_time
    assert simulate(schedule, 2.0, 4.0, dp_comm=_comm(3, t=1.0)).step_time == pytest.approx(base + 2.0)
    # ZeRO-1: the reduce-scatters overlap but the last; the post-step all-gathers (one per chunk) do not.
    assert simulate(schedule, 2.0, 4.0, dp_comm=_comm(1, t=1.0)).step_time == pytest.approx(base + 1.0 + 2.0)


def test_reduce_not_overlapped_waits_for_the_last_compute():
    """overlap_reduce=False: every reduce-scatter after the rank's last backward, back to back."""
    schedule = build_schedule("breadth-first", 2, 2, 4)
    r = simulate(schedule, 2.0, 4.0, dp_comm=_comm(1, t=1.0, overlap_reduce=False))
    for end, events in zip(r.compute_end, r.dp_events):
        reduces = [e for e in events if e.kind == "reduce_scatter"]
        assert [(e.start, e.end) for e in reduces] == [(end, end + 1.0), (end + 1.0, end + 2.0)]
    base = simulate(schedule, 2.0, 4.0).step_time
    assert r.step_time == pytest.approx(base + 2 * 1.0 + 2 * 1.0)


@pytest.mark.parametrize("t", [1.0, 1.5])
def test_breadth_first_hides_what_interleaved_cannot(t):
    """Interleaved re-gathers each chunk every pp microbatches: exposed where breadth-first's are not."""
    base = simulate(build_schedule("interleaved", 2, 2, 8), 1.0, 2.0).step_time
    bf = simulate(build_schedule("breadth-first", 2, 2, 8), 1.0, 2.0, dp_comm=_comm(3, t=t))
    il = simulate(build_schedule("interleaved", 2, 2, 8), 1.0, 2.0, dp_comm=_comm(3, t=t))
    assert bf.step_time == pytest.approx(base + 2 * t)
    assert il.step_time > bf.step_time + t


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"dp": 0}, "dp"),
        ({"zero": 2}, "zero"),
        ({"bandwidth": 0.0}, "bandwidth"),
        ({"latency": -1.0}, "latency"),
        ({"grad_bytes_per_chunk": -1.0}, "grad_bytes_per_chunk"),
    ],
)
def test_bad_comm_config(kw, match):
    args = {"dp": 2, "zero": 3, "param_bytes_per_chunk": 1.0, **kw}
    with pytest.raises(ValueError, match=match):
        DataParallelComm(**args)


def test_cli_dp_flags_table_and_errors(capsys):
    tool = _load("tools/simulate_pipeline.py", "simulate_pipeline_dp")
    base = ["--pp", "2", "--vpp", "2", "--microbatches", "4", "--dp", "4", "--t-fwd", "10", "--t-bwd", "20"]
    model = ["--model-params", "1e9", "--num-layers", "8", "--tp", "2"]
    assert tool.main(["--schedule", "breadth-first", "--zero", "3", *base, *model, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # 1e9 params / 8 layers * 2 layers per chunk / tp 2 * 2 bytes = 2.5e8 bytes at 25 GB/s, 10 us.
    assert data["dp"]["t_all_gather"] == pytest.approx(0.75 * 2.5e8 / 25e6 + 3 * 0.01)
    assert data["dp"]["all_gathers_per_rank"] == [4, 4]
    assert tool.main(["--dp-table", *base, "--param-bytes-per-chunk", "1e8"]) == 0
    table = capsys.readouterr().out
    assert "| breadth-first |" in table and "| interleaved |" in table
    with pytest.raises(SystemExit):
        tool.main(["--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--dp", "2"])
    assert "--param-bytes-per-chunk" in capsys.readouterr().err


def test_paper_table_script_runs_small():
    bench = _load("benchmarks/simulate_breadth_first.py", "simulate_breadth_first")
    setting = {**bench.SETTING, "pp": 2, "vpp": 2, "dp": 4}
    rows = bench.run(setting, [2, 4])
    assert rows[1]["breadth-first zero3"]["all_gathers"] == 4
    assert rows[1]["interleaved zero3"]["all_gathers"] == 8
    assert "over best IL" in bench.to_markdown(rows)
    assert rows[1]["interleaved zero1 no overlap"]["step_ms"] > rows[1]["interleaved zero1"]["step_ms"]


def test_plot_draws_the_dp_stream(tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_lite.pipeline.plotting import plot_timeline

    r = simulate(build_schedule("breadth-first", 2, 2, 2), dp_comm=_comm(3, t=0.5))
    out = tmp_path / "dp.png"
    plot_timeline(r, str(out), title="dp")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

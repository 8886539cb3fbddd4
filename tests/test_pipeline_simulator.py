"""Pipeline simulator: closed-form bubbles, peak activations, deadlocks, CLI (pure Python)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megatron_lite.pipeline.actions import Action
from megatron_lite.pipeline.schedules import SCHEDULES, build_schedule, ideal_bubble_fraction
from megatron_lite.pipeline.simulator import PipelineDeadlock, ScheduleError, simulate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "simulate_pipeline.py")

# Forward:backward time ratios checked against the closed forms.
RATIOS = [(1.0, 2.0), (1.0, 1.0), (1.0, 3.0), (2.0, 1.0)]

MATRIX = [
    (name, pp, vpp, m)
    for name in SCHEDULES
    for pp in (1, 2, 4)
    for vpp in (1, 2)
    for m in (1, 2, 3, 4, 5, 8)
    if not (vpp > 1 and (pp == 1 or name in ("gpipe", "1f1b")))
    and not (name == "interleaved" and vpp > 1 and m % pp)
]


def F(c, m):
    return Action("F", c, m)


def B(c, m):
    return Action("B", c, m)


def comm(kind, c, m, peer):
    return Action(kind, c, m, peer)


@pytest.mark.parametrize("name, pp, vpp, m", MATRIX)
def test_no_deadlock_and_closed_form_bubble(name, pp, vpp, m):
    schedule = build_schedule(name, pp, vpp, m)
    ideal = ideal_bubble_fraction(name, pp, vpp, m)
    for t_fwd, t_bwd in RATIOS:
        result = simulate(schedule, t_fwd, t_bwd, 0.0)
        if ideal is not None:
            assert result.bubble_fraction == pytest.approx(ideal, abs=1e-12)
            v = vpp if name in ("interleaved", "breadth-first") else 1
            assert result.step_time == pytest.approx((v * m + pp - 1) * (t_fwd + t_bwd) / v)
        # The strictest executor (every batch waits for its sends) must not deadlock either.
        strict = simulate(schedule, t_fwd, t_bwd, 0.0, mode="rendezvous")
        if name != "interleaved" and ideal is not None:
            # Non-interleaved schedules lose nothing to blocking sends.
            assert strict.bubble_fraction == pytest.approx(ideal, abs=1e-12)
        assert strict.bubble_fraction >= result.bubble_fraction - 1e-12


@pytest.mark.parametrize("group, m", [(2, 4), (3, 5), (4, 4), (2, 6)])
def test_interleaved_group_sizes_deadlock_free_and_ideal(group, m):
    schedule = build_schedule("interleaved", 2, 3, m, microbatch_group_size=group)
    assert simulate(schedule).bubble_fraction == pytest.approx(1 / (3 * m + 1))
    simulate(schedule, mode="rendezvous")


def test_closed_form_examples_and_timeline():
    result = simulate(build_schedule("1f1b", 4, 1, 8), t_fwd=1.0, t_bwd=2.0)
    assert result.step_time == pytest.approx(33.0)  # (M + P - 1) * (f + b)
    assert result.bubble_fraction == pytest.approx(3 / 11)
    result = simulate(build_schedule("interleaved", 4, 2, 8), t_fwd=1.0, t_bwd=2.0)
    assert result.step_time == pytest.approx(28.5)  # (V*M + P - 1) * (f + b) / V
    for timeline in result.timelines:
        assert len(timeline) == 2 * 2 * 8
        assert all(a.end <= b.start + 1e-12 for a, b in zip(timeline, timeline[1:]))
        assert {iv.end - iv.start for iv in timeline} == {0.5, 1.0}  # t/vpp per chunk


def test_single_stage_has_no_bubble():
    result = simulate(build_schedule("1f1b", 1, 1, 4), t_fwd=1.0, t_bwd=2.0, t_comm=5.0)
    assert result.step_time == pytest.approx(12.0)
    assert result.bubble_fraction == pytest.approx(0.0)


def test_comm_latency_adds_to_the_critical_path():
    # pp=2, one microbatch: F0 | comm | F1 B1 | comm | B0.
    for mode in ("async", "rendezvous"):
        result = simulate(build_schedule("1f1b", 2, 1, 1), 1.0, 2.0, t_comm=0.5, mode=mode)
        assert result.step_time == pytest.approx(7.0)
    slow = simulate(build_schedule("interleaved", 4, 2, 8), 1.0, 2.0, t_comm=0.1)
    assert slow.step_time > 28.5


@pytest.mark.parametrize("pp, m", [(4, 8), (4, 2), (2, 3), (4, 4)])
def test_peak_activations(pp, m):
    assert simulate(build_schedule("1f1b", pp, 1, m)).peak_activations[0] == min(pp, m)
    assert simulate(build_schedule("1f1b", pp, 1, m)).peak_activations[-1] == 1
    assert simulate(build_schedule("gpipe", pp, 1, m)).peak_activations == [m] * pp
    assert simulate(build_schedule("breadth-first", pp, 2, m)).peak_activations == [2 * m] * pp


def test_interleaved_peak_matches_megatron_warmup():
    peaks = simulate(build_schedule("interleaved", 4, 2, 8)).peak_activations
    # warmup (2 * (P - r - 1) + (V - 1) * P) forwards, then one more before the first backward.
    assert peaks == [2 * (4 - r - 1) + 4 + 1 for r in range(4)]


def test_planted_comm_deadlock_is_reported_with_ranks():
    # Each rank first waits for a message the other only sends after it: the backward gradient
    # is received before the forward activation is sent.
    bad = [
        [F(0, 0), comm("RECV_B", 0, 0, 1), B(0, 0), comm("SEND_F", 0, 0, 1)],
        [comm("RECV_F", 0, 0, 0), F(0, 0), B(0, 0), comm("SEND_B", 0, 0, 0)],
    ]
    for mode in ("async", "rendezvous"):
        with pytest.raises(PipelineDeadlock) as info:
            simulate(bad, mode=mode)
        assert set(info.value.blocked) == {0, 1}
        assert "rank 0" in str(info.value) and "rank 1" in str(info.value)
        assert Action("RECV_B", 0, 0, 1) in info.value.blocked[0]
        assert Action("RECV_F", 0, 0, 0) in info.value.blocked[1]


def test_blocking_sends_deadlock_only_under_rendezvous():
    # Rank 0 posts its gradient receive alone before sending the activation: fine if sends and
    # receives never block the rank, a deadlock if every batch waits for completion.
    bad = [
        [comm("RECV_B", 0, 0, 1), F(0, 0), comm("SEND_F", 0, 0, 1), B(0, 0)],
        [comm("RECV_F", 0, 0, 0), F(0, 0), B(0, 0), comm("SEND_B", 0, 0, 0)],
    ]
    simulate(bad)
    with pytest.raises(PipelineDeadlock, match="rank 0 blocked on RECV_B"):
        simulate(bad, mode="rendezvous")


def test_schedule_errors():
    missing_send = [[F(0, 0), B(0, 0)], [comm("RECV_F", 0, 0, 0), F(0, 0), B(0, 0)]]
    with pytest.raises(ScheduleError, match="no send"):
        simulate(missing_send)
    missing_recv = [[F(0, 0), comm("SEND_F", 0, 0, 1), B(0, 0)], [F(0, 0), B(0, 0)]]
    with pytest.raises(ScheduleError, match="no receive"):
        simulate(missing_recv)
    swapped = [
        [F(0, 0), comm("SEND_F", 0, 0, 1), F(0, 1), comm("SEND_F", 0, 1, 1), B(0, 0), B(0, 1)],
        [comm("RECV_F", 0, 1, 0), comm("RECV_F", 0, 0, 0), F(0, 0), F(0, 1), B(0, 0), B(0, 1)],
    ]
    with pytest.raises(ScheduleError, match="in order"):
        simulate(swapped)
    with pytest.raises(ScheduleError, match="forward has not run"):
        simulate([[B(0, 0), F(0, 0)]])
    with pytest.raises(ScheduleError, match="already ran"):
        simulate([[F(0, 0), F(0, 0), B(0, 0)]])
    late_recv = [
        [F(0, 0), comm("SEND_F", 0, 0, 1), comm("RECV_B", 0, 0, 1), B(0, 0)],
        [F(0, 0), comm("RECV_F", 0, 0, 0), B(0, 0), comm("SEND_B", 0, 0, 0)],
    ]
    with pytest.raises(ScheduleError, match="no RECV_F"):
        simulate(late_recv)
    with pytest.raises(ValueError, match="mode"):
        simulate([[F(0, 0), B(0, 0)]], mode="eager")


# --------------------------------------------------------------------------- CLI


def _load_tool():
    spec = importlib.util.spec_from_file_location("simulate_pipeline", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_json_from_repo_root():
    out = subprocess.run(
        [
            sys.executable,
            "tools/simulate_pipeline.py",
            "--schedule",
            "interleaved",
            "--pp",
            "4",
            "--vpp",
            "2",
            "--microbatches",
            "8",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(out)
    assert data["step_time"] == pytest.approx(28.5)
    assert data["bubble_fraction"] == pytest.approx(3 / 19)
    assert data["peak_activations"] == [11, 9, 7, 5]


def test_cli_report_all_and_errors(capsys):
    tool = _load_tool()
    assert tool.main(["--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--t-comm", "0.1"]) == 0
    text = capsys.readouterr().out
    assert "step time" in text and "bubble" in text and "rank 3: 1" in text
    assert tool.main(["--all", "--pp", "2", "--vpp", "2", "--microbatches", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {s["schedule"] for s in data["schedules"]} == {"interleaved", "breadth-first"}
    assert set(data["skipped"]) == {"gpipe", "1f1b"}
    assert tool.main(["--schedule", "interleaved", "--pp", "4", "--vpp", "2", "--microbatches", "6"]) == 1
    assert "multiple of 4" in capsys.readouterr().err


def test_cli_plot(tmp_path, capsys, monkeypatch):
    tool = _load_tool()
    args = ["--schedule", "breadth-first", "--pp", "2", "--vpp", "2", "--microbatches", "3"]
    monkeypatch.setattr(tool, "matplotlib_available", lambda: False)
    assert tool.main([*args, "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    monkeypatch.undo()
    out = tmp_path / "timeline.png"
    assert tool.main([*args, "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

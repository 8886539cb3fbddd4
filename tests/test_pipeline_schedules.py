"""Layer placement and pipeline schedule generation (pure Python, no processes)."""

from __future__ import annotations

import pytest

from megatron_lite.pipeline.actions import Action, check_pairing, comm_for
from megatron_lite.pipeline.placement import (
    is_first_stage,
    is_last_stage,
    layer_placement,
    stage_location,
    virtual_stage,
)
from megatron_lite.pipeline.schedules import (
    SCHEDULES,
    build_schedule,
    ideal_bubble_fraction,
    interleaved_1f1b,
    one_f_one_b,
)

# Every (schedule, pp, vpp, M) the schedule accepts, over a grid.
MATRIX = [
    (name, pp, vpp, m)
    for name in SCHEDULES
    for pp in (1, 2, 4)
    for vpp in (1, 2)
    for m in (1, 2, 3, 4, 5, 8)
    if not (vpp > 1 and (pp == 1 or name in ("gpipe", "1f1b")))
    and not (name == "interleaved" and vpp > 1 and m % pp)
]


def compute_only(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not a.is_comm]


# --------------------------------------------------------------------------- placement


def test_placement_pp4_vpp2_16_layers():
    placement = layer_placement(16, 4, 2)
    assert placement[0] == [range(0, 2), range(8, 10)]
    assert placement[1] == [range(2, 4), range(10, 12)]
    assert placement[3] == [range(6, 8), range(14, 16)]
    assert sorted(i for rank in placement for chunk in rank for i in chunk) == list(range(16))


def test_placement_single_stage_and_even_split():
    assert layer_placement(6, 1) == [[range(0, 6)]]
    assert layer_placement(8, 2) == [[range(0, 4)], [range(4, 8)]]


def test_placement_uneven_first_and_last():
    # 30 layers, first 3 + last 3, the remaining 24 over 6 middle virtual stages.
    placement = layer_placement(30, 4, 2, first_stage_layers=3, last_stage_layers=3)
    assert placement[0][0] == range(0, 3)
    assert placement[3][1] == range(27, 30)
    assert placement[1][0] == range(3, 7)
    assert placement[0][1] == range(15, 19)
    assert layer_placement(10, 2, first_stage_layers=4) == [[range(0, 4)], [range(4, 10)]]


def test_stage_mapping_and_embedding_output_owners():
    assert virtual_stage(1, 1, 4) == 5
    assert stage_location(5, 4) == (1, 1)
    assert is_first_stage(0, 0) and not is_first_stage(0, 1)
    assert is_last_stage(3, 1, 4, 2) and not is_last_stage(3, 0, 4, 2)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(num_layers=15, pp=4, vpp=2), ["num_layers (15)", "8"]),
        (dict(num_layers=16, pp=1, vpp=2), ["virtual_pipeline_parallel (2)", "pipeline_parallel"]),
        (dict(num_layers=0, pp=2, vpp=1), ["num_layers (0)", "positive"]),
        (dict(num_layers=8, pp=-1, vpp=1), ["pipeline_parallel (-1)"]),
        (dict(num_layers=8, pp=2, vpp=0), ["virtual_pipeline_parallel (0)"]),
        (dict(num_layers=8, pp=2, vpp=1, first_stage_layers=0), ["first_stage_layers (0)"]),
        (dict(num_layers=8, pp=4, vpp=1, first_stage_layers=3), ["first_stage_layers (3)", "5 layers"]),
        (dict(num_layers=8, pp=2, vpp=1, first_stage_layers=3, last_stage_layers=3), ["2 layers"]),
        (dict(num_layers=4, pp=4, vpp=1, first_stage_layers=2), ["at least one layer"]),
        (dict(num_layers=4, pp=1, vpp=1, last_stage_layers=2), ["last_stage_layers (2)", "num_layers (4)"]),
    ],
)
def test_placement_errors_name_fields_and_numbers(kwargs, words):
    with pytest.raises(ValueError) as info:
        layer_placement(**kwargs)
    for word in words:
        assert word in str(info.value)


# --------------------------------------------------------------------------- actions


def test_action_validation_and_str():
    assert str(Action("SEND_F", 1, 3, peer=2)) == "SEND_F(c1,m3->2)"
    assert str(Action("B", 0, 1)) == "B(c0,m1)"
    with pytest.raises(ValueError, match="kind"):
        Action("X", 0, 0)
    with pytest.raises(ValueError, match="peer"):
        Action("RECV_F", 0, 0)
    with pytest.raises(ValueError, match="peer"):
        Action("F", 0, 0, peer=1)


def test_comm_for_uses_virtual_stage_neighbours():
    # pp=4, vpp=2: rank 0 chunk 1 is stage 4, fed by stage 3 (rank 3) and feeding stage 5 (rank 1).
    recv, send = comm_for(Action("F", 1, 0), 0, 4, 2)
    assert (recv.kind, recv.peer, send.kind, send.peer) == ("RECV_F", 3, "SEND_F", 1)
    recv, send = comm_for(Action("B", 1, 0), 0, 4, 2)
    assert (recv.kind, recv.peer, send.kind, send.peer) == ("RECV_B", 1, "SEND_B", 3)
    assert comm_for(Action("F", 0, 0), 0, 4, 2)[0] is None  # embedding stage: no input
    assert comm_for(Action("B", 1, 0), 3, 4, 2)[0] is None  # loss stage: gradient is local


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name, pp, vpp, m", MATRIX)
def test_every_chunk_microbatch_runs_forward_and_backward_once(name, pp, vpp, m):
    schedule = build_schedule(name, pp, vpp, m)
    assert len(schedule) == pp
    expected = {(c, mb) for c in range(vpp) for mb in range(m)}
    for rank, actions in enumerate(schedule):
        compute = compute_only(actions)
        fwd = [(a.chunk, a.microbatch) for a in compute if a.kind == "F"]
        bwd = [(a.chunk, a.microbatch) for a in compute if a.kind == "B"]
        assert sorted(fwd) == sorted(expected) and sorted(bwd) == sorted(expected)
        position = {(a.kind, a.chunk, a.microbatch): i for i, a in enumerate(compute)}
        assert all(position[("F", c, mb)] < position[("B", c, mb)] for c, mb in expected)
        # Every receive comes before the compute that consumes it, every send after its producer.
        index = {a: i for i, a in enumerate(actions)}
        for i, a in enumerate(actions):
            recv, send = comm_for(a, rank, pp, vpp) if not a.is_comm else (None, None)
            assert recv is None or index[recv] < i
            assert send is None or index[send] > i
    check_pairing(schedule)
    if pp == 1:
        assert all(not a.is_comm for actions in schedule for a in actions)


@pytest.mark.parametrize("pp, m", [(4, 8), (4, 2), (2, 5), (1, 3)])
def test_1f1b_warmup_steady_cooldown(pp, m):
    for rank, actions in enumerate(one_f_one_b(pp, 1, m)):
        kinds = "".join(a.kind for a in compute_only(actions))
        warmup = min(pp - rank - 1, m)
        assert kinds.startswith("F" * warmup + ("FB" if warmup < m else "B"))
        assert kinds == "F" * warmup + "FB" * (m - warmup) + "B" * warmup


def test_gpipe_all_forwards_then_all_backwards():
    for actions in build_schedule("gpipe", 3, 1, 4):
        assert "".join(a.kind for a in compute_only(actions)) == "FFFFBBBB"


def test_interleaved_follows_megatron_table():
    # Megatron's docstring example: PP=2, VP=2, group size 3, M=5.
    fwd = [(a.microbatch, a.chunk) for a in compute_only(interleaved_1f1b(2, 2, 5, 3)[0]) if a.kind == "F"]
    assert [m for m, _ in fwd] == [0, 1, 2, 0, 1, 2, 3, 4, 3, 4]
    assert [c for _, c in fwd] == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    # Default group = pp; backward visits chunks in reverse.
    bwd = [(a.microbatch, a.chunk) for a in compute_only(interleaved_1f1b(2, 2, 4)[1]) if a.kind == "B"]
    assert bwd[:4] == [(0, 1), (1, 1), (0, 0), (1, 0)]
    # Warmup on rank r: 2 * (pp - r - 1) + (vpp - 1) * group forwards.
    for rank, actions in enumerate(interleaved_1f1b(4, 2, 8)):
        kinds = "".join(a.kind for a in compute_only(actions))
        assert kinds.index("B") == 2 * (4 - rank - 1) + 4 + 1


def test_interleaved_with_vpp1_is_1f1b():
    assert interleaved_1f1b(4, 1, 6) == one_f_one_b(4, 1, 6)


def test_breadth_first_runs_chunk_by_chunk():
    for actions in build_schedule("breadth-first", 2, 2, 3):
        order = [(a.kind, a.chunk) for a in compute_only(actions)]
        assert order == [("F", 0)] * 3 + [("F", 1)] * 3 + [("B", 1)] * 3 + [("B", 0)] * 3


def test_breadth_first_accepts_any_microbatch_count():
    assert len(build_schedule("breadth-first", 4, 2, 6)) == 4


def test_build_schedule_errors():
    with pytest.raises(ValueError) as info:
        build_schedule("zero-bubble", 2, 1, 4)
    assert all(name in str(info.value) for name in SCHEDULES)
    for name in ("gpipe", "1f1b"):
        with pytest.raises(ValueError, match="interleaved"):
            build_schedule(name, 4, 2, 8)
    with pytest.raises(ValueError, match=r"num_microbatches \(6\).*multiple of 4"):
        build_schedule("interleaved", 4, 2, 6)
    with pytest.raises(ValueError, match=r"num_microbatches \(2\)"):
        build_schedule("interleaved", 4, 2, 2)
    with pytest.raises(ValueError, match="num_microbatches"):
        build_schedule("1f1b", 4, 1, 0)
    with pytest.raises(ValueError, match="pipeline_parallel"):
        build_schedule("breadth-first", 1, 2, 4)


def test_interleaved_group_size_relaxes_multiple_of_pp():
    # Megatron's rule: M % group must be 0 or >= pp.
    assert len(build_schedule("interleaved", 2, 2, 5, microbatch_group_size=3)) == 2
    with pytest.raises(ValueError, match="= 1 must be 0 or >= pipeline_parallel"):
        build_schedule("interleaved", 4, 2, 9, microbatch_group_size=4)


def test_ideal_bubble_fraction():
    assert ideal_bubble_fraction("1f1b", 4, 1, 8) == pytest.approx(3 / 11)
    assert ideal_bubble_fraction("interleaved", 4, 2, 8) == pytest.approx(3 / 19)
    assert ideal_bubble_fraction("breadth-first", 4, 2, 2) is None

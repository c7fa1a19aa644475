"""What the watchdog counts and the phase clock times, on 2 real gloo ranks: the process group's
sequence number moves for torch.distributed calls, DTensor's functional collectives and
pipelining's p2p alike; the wrappers time the calls by group and put torch's functions back."""

from __future__ import annotations

from typing import Any

import torch

from tests.helpers.spawn import run_on_mesh


def _count(mesh: Any) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.pipelining.schedules as schedules
    from torch.distributed._functional_collectives import all_reduce as functional_all_reduce

    from parallel.observe.comm import CommTracker

    world = dist.group.WORLD
    assert world is not None
    seq = world._get_sequence_number_for_group
    bare = dist.all_reduce
    tracker = CommTracker({world.group_name: "dp_comm"})
    tracker.install()
    out: dict[str, Any] = {"wrapped": dist.all_reduce is not bare}
    t = torch.ones(4)
    before = seq()
    dist.all_reduce(t)  # a plain collective
    out["all_reduce"] = seq() - before
    work = dist.all_reduce(t, async_op=True)  # async: its wait is timed by Work.wait
    work.wait()
    before = seq()
    functional_all_reduce(t, "sum", world).wait()  # DTensor's kind: no Python c10d call
    out["functional"] = seq() - before
    peer = 1 - dist.get_rank()
    op = dist.isend if dist.get_rank() == 0 else dist.irecv
    before = seq()
    for w in schedules._batch_p2p([dist.P2POp(op, t, peer, world)]):  # pipelining's p2p
        w.wait()
    out["p2p"] = seq() - before
    out["last"] = tracker.last_completed.name if tracker.last_completed else None
    out["phases"] = sorted(tracker.take())
    tracker.uninstall()
    out["restored"] = dist.all_reduce is bare and schedules._batch_p2p.__name__ == "_batch_p2p"
    return out


def test_every_kind_of_operation_moves_the_sequence_number_and_is_timed() -> None:
    for result in run_on_mesh((2, 1, 1), _count, timeout=120):
        assert result["wrapped"] and result["restored"], result
        assert result["all_reduce"] == result["functional"] == result["p2p"] == 1, result
        assert result["last"] == "pipeline_p2p"
        # p2p on a group mapped to dp_comm counts there; the functional one is not a Python call
        assert result["phases"] == ["dp_comm"], result


def test_a_tracker_left_installed_by_a_failed_run_is_undone_not_stacked() -> None:
    import torch.distributed as dist

    from parallel.observe.comm import CommTracker

    bare = dist.all_reduce
    CommTracker({}).install()  # its run raised before uninstall
    second = CommTracker({})
    second.install()
    assert dist.all_reduce.__wrapped__ is bare  # type: ignore[attr-defined]
    second.uninstall()
    assert dist.all_reduce is bare

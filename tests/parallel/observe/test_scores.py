"""Straggler scores and hang suspects as pure functions (no process group)."""

from __future__ import annotations

import torch

from parallel.observe.phases import PHASES_ALL, StragglerScores
from parallel.observe.watchdog import suspects


def _times(rows: list[dict[str, float]]) -> torch.Tensor:
    return torch.tensor([[row.get(p, 0.0) for p in PHASES_ALL] for row in rows])


def test_only_a_working_phase_well_above_the_others_stands_out() -> None:
    scores = StragglerScores(world=4, threshold=0.5)
    base = {"compute": 0.1, "dp_comm": 0.02, "optimizer": 0.01, "data": 0.0001}
    slow = {**base, "data": 0.2}
    waiting = {**base, "dp_comm": 0.22}  # the others wait for rank 2 in their collectives
    out, relative, individual = scores.score(_times([waiting, waiting, slow, waiting]))
    assert [(s.rank, s.phase) for s in out] == [(2, "data")]
    assert relative[2, PHASES_ALL.index("data")] < 0.01 and individual.max() == 1
    # a 2x slower 0.1 ms phase is noise, not a straggler
    out, _, _ = scores.score(_times([base, base, {**base, "data": 0.0002}, base]))
    assert out == []
    # individual: against the rank's own best interval so far (0.0002 s), not the other ranks
    _, _, individual = scores.score(_times([base, base, {**base, "data": 0.0004}, base]))
    assert abs(individual[2, PHASES_ALL.index("data")] - 0.5) < 1e-3


def _state(seqs: dict[str, int]) -> dict:
    return {"groups": {n: {"label": n, "ranks": [0, 1, 2, 3], "seq": s} for n, s in seqs.items()}}


def test_the_rank_out_of_step_in_most_groups_is_the_suspect() -> None:
    # rank 3 skipped an all-reduce on group a, then started the next op of group b alone
    states = {r: _state({"a": 6, "b": 170}) for r in range(3)}
    states[3] = _state({"a": 5, "b": 171})
    named, groups = suspects(states, 4)
    assert named == [3]
    by_name = {g["group"]: g for g in groups}
    assert by_name["a"]["behind"] == [3] and by_name["a"]["waiting_at_seq"] == 6
    assert by_name["b"]["ahead"] == [3]
    # a rank that posted nothing (dead or frozen) is named too
    named, _ = suspects({r: _state({"a": 6}) for r in range(3)}, 4)
    assert named == [3]

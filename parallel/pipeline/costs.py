"""Play a per-rank action order forward at given per-stage costs: when every action starts and
ends, each waiting for the ones it depends on plus one p2p transfer when those ran on another
rank. The schedule replay (simulate.py) and the zero-bubble order search (parallel/pipeline/orders.py)
both read it. Written by hand: torch lists orders but does not replay them at costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.distributed.pipelining.schedules import generate_stage_to_rank_mapping

Done = tuple[str, int, int | None]  # (F or B, stage, microbatch) of a finished action


@dataclass(frozen=True)
class StageCosts:
    """Per stage, the time of one microbatch's forward, input gradient and weight gradient,
    and the time of one p2p transfer between ranks (any unit, the same for all)."""

    forward: tuple[float, ...]
    input_grad: tuple[float, ...]
    weight_grad: tuple[float, ...]
    p2p: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.forward)
        if not n or len(self.input_grad) != n or len(self.weight_grad) != n:
            raise ValueError("StageCosts: forward, input_grad and weight_grad need one per stage")
        if min(self.forward + self.input_grad + self.weight_grad) <= 0 or self.p2p < 0:
            raise ValueError("StageCosts: compute costs must be > 0 and p2p >= 0")

    @classmethod
    def uniform(
        cls, n_stages: int, pp: int, f: float = 1.0, i: float = 1.0, w: float = 1.0
    ) -> StageCosts:
        """Equal stages: a rank's forward costs f, split evenly over its n_stages / pp chunks."""
        v = n_stages // pp
        return cls((f / v,) * n_stages, (i / v,) * n_stages, (w / v,) * n_stages)

    def cost(self, kind: str, stage: int) -> float:
        """The time of one action of `kind` (F, I, W, or B = I + W) on `stage`."""
        if kind == "B":
            return self.input_grad[stage] + self.weight_grad[stage]
        return {"F": self.forward, "I": self.input_grad, "W": self.weight_grad}[kind][stage]


def stage_to_rank(pp: int, n_stages: int, v_shape: bool) -> dict[int, int]:
    """Where each stage sits: looped (s on rank s mod pp) or the V (r and 2pp-1-r on rank r)."""
    return generate_stage_to_rank_mapping(pp, n_stages, style="v" if v_shape else "loop")


def prerequisites(action: Any, n_stages: int) -> list[Done]:
    """(F or B, stage, microbatch) that must finish before `action` starts."""
    kind, s, mb = action.computation_type.value, action.stage_index, action.microbatch_index
    if kind == "F":
        return [("F", s - 1, mb)] * (s > 0)
    if kind == "W":
        return [("B", s, mb)]
    return [("F", s, mb)] + [("B", s + 1, mb)] * (s < n_stages - 1)  # B or I


def replay(
    ops: list[list[list[Any]]], n_stages: int, costs: StageCosts, to_rank: dict[int, int]
) -> list[float]:
    """Each rank's finish time when it runs its actions in order (an inner list runs as one
    step, as an OVERLAP_F_B's two actions do: its outputs are sent after both)."""
    pp = len(ops)
    done: dict[Done, float] = {}  # -> finish time
    clock, nxt = [0.0] * pp, [0] * pp
    while any(nxt[r] < len(ops[r]) for r in range(pp)):
        before = sum(nxt)
        for r in range(pp):
            while nxt[r] < len(ops[r]) and all(
                d in done for a in ops[r][nxt[r]] for d in prerequisites(a, n_stages)
            ):
                for a in ops[r][nxt[r]]:
                    arrivals = [
                        done[d] + costs.p2p * (to_rank[d[1]] != r)
                        for d in prerequisites(a, n_stages)
                    ]
                    clock[r] = max([clock[r]] + arrivals)
                    clock[r] += costs.cost(a.computation_type.value, a.stage_index)
                for a in ops[r][nxt[r]]:
                    kind = a.computation_type.value
                    done["B" if kind == "I" else kind, a.stage_index, a.microbatch_index] = clock[r]
                nxt[r] += 1
        if sum(nxt) == before:
            raise RuntimeError("the action order deadlocks in the replay")
    return clock


def busiest_rank_work(costs: StageCosts, to_rank: dict[int, int], microbatches: int) -> float:
    """The compute time of the rank with the most work: F + I + W of every local stage, m times."""
    work: dict[int, float] = {}
    for s, r in to_rank.items():
        cost = costs.forward[s] + costs.input_grad[s] + costs.weight_grad[s]
        work[r] = work.get(r, 0.0) + microbatches * cost
    return max(work.values())

"""Per-rank phase times, gathered with one all_gather every interval, and the straggler scores
read from them: relative (the best rank's time / this rank's, per phase) and individual (this
rank's own best interval / this one). 1 is the best; a straggler scores low.

Only the phases a rank spends working can make it a straggler: data, compute, optimizer,
checkpoint. The others (pipeline waits, collectives) are where the other ranks wait for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

PHASES = ("data", "compute", "pp_wait", "dp_comm", "tp_comm", "cp_comm", "comm", "optimizer")
PHASES_ALL = (*PHASES, "checkpoint")
WORK_PHASES = ("data", "compute", "optimizer", "checkpoint")


def gather_phase_times(seconds: dict[str, float], steps: int) -> torch.Tensor:
    """Every rank's seconds per step in each phase, as a [world, phases] tensor; one all_gather
    of a small float tensor (on the CPU for gloo, the device for NCCL): call on every rank."""
    row = torch.tensor([seconds.get(p, 0.0) / max(1, steps) for p in PHASES_ALL])
    group = dist.group.WORLD
    if dist.get_backend(group) == "nccl":
        row = row.cuda()
    out = torch.empty(dist.get_world_size() * len(PHASES_ALL), dtype=row.dtype, device=row.device)
    dist.all_gather_single(out, row)  # the interval's one collective
    return out.view(-1, len(PHASES_ALL)).cpu()


@dataclass(frozen=True)
class Straggler:
    """One rank standing out in one working phase over an interval."""

    rank: int
    phase: str
    seconds: float  # this rank's seconds per step in the phase
    best: float  # the best rank's
    relative: float  # best / seconds
    individual: float  # this rank's own best interval / seconds

    def describe(self) -> str:
        """`rank 2 data 0.201 s/step (best rank 0.001 s; relative 0.00, individual 1.00)`."""
        return (
            f"rank {self.rank} {self.phase} {self.seconds:.3f} s/step (best rank {self.best:.3f} s; "
            f"relative {self.relative:.2f}, individual {self.individual:.2f})"
        )


class StragglerScores:
    """Scores each gathered interval against the best rank and each rank's own best so far."""

    def __init__(self, world: int, threshold: float, min_share: float = 0.1) -> None:
        """threshold: a relative score below it stands out, when the rank's excess over the
        median rank is also at least min_share of the step time (a 0.1 ms phase twice as slow as
        the best is noise, and so is one rank that happened to be fastest)."""
        self.threshold, self.min_share = threshold, min_share
        self.own_best = torch.full((world, len(PHASES_ALL)), float("inf"), dtype=torch.float64)

    def score(self, times: torch.Tensor) -> tuple[list[Straggler], torch.Tensor, torch.Tensor]:
        """(stragglers, relative [world, phases], individual [world, phases]) of one interval."""
        times = times.double()
        self.own_best = torch.minimum(self.own_best, times)
        tiny = 1e-9
        best = times.min(dim=0).values
        median = times.median(dim=0).values
        relative = (best + tiny) / (times + tiny)
        individual = (self.own_best + tiny) / (times + tiny)
        step = times.sum(dim=1).median().item()
        out = []
        for p, phase in enumerate(PHASES_ALL):
            if phase not in WORK_PHASES:
                continue
            for r in range(times.shape[0]):
                excess = times[r, p].item() - median[p].item()
                if relative[r, p] < self.threshold and excess >= self.min_share * step:
                    out.append(
                        Straggler(
                            r,
                            phase,
                            times[r, p].item(),
                            best[p].item(),
                            relative[r, p].item(),
                            individual[r, p].item(),
                        )
                    )
        return out, relative, individual

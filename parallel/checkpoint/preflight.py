"""Before the first step: can every rank write into the checkpoint root, and how much will fit?

A run that cannot save should stop before it trains, not after hours: every rank creates,
writes and removes a probe file in the root and measures the free space there, and the findings
are gathered so that all ranks decide alike (and raise together instead of hanging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from parallel.checkpoint.backends import storage_for
from parallel.checkpoint.format import TMP_PREFIX
from parallel.checkpoint.state import ModelParts, model_state
from parallel.checkpoint.storage import Location, as_location

__all__ = ["RootCheck", "check_root"]


@dataclass
class RootCheck:
    """What every rank found about a checkpoint root (the same on every rank)."""

    problems: list[str]  # why some rank cannot write there; empty when all can
    # the least free space any rank sees there (0 when it cannot write; None where the storage
    # has no free space to read, an object store)
    free_bytes: int | None
    checkpoint_bytes: int  # one checkpoint's expected size: weights plus optimizer moments


def _probe(root: Location) -> str | None:
    """Create root, write a file there and remove it; what failed, or None."""
    storage = storage_for(root)
    # .tmp-: the next save clears what a killed probe left
    probe = storage.join(root, f"{TMP_PREFIX}probe-rank{dist.get_rank()}")
    try:
        storage.makedirs(root)
        with storage.open_write(probe) as f:  # durable on exit, as a shard would be
            f.write(b"tridist")
        storage.remove(probe)
    except OSError as err:
        return f"cannot write {err.filename or probe}: {err.strerror or err}"
    return None


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:4]))
    more = f" and {len(ranks) - 4} more" if len(ranks) > 4 else ""
    return f"rank {shown}{more}" if len(ranks) == 1 else f"ranks {shown}{more}"


def check_root(
    root: Location, model: ModelParts, moments: int = 2, group: dist.ProcessGroup | None = None
) -> RootCheck:
    """Probe `root` on every rank and size one checkpoint of `model`; a collective over `group`.

    moments: optimizer tensors per parameter, each the parameter's size (AdamW: exp_avg and
    exp_avg_sq); the scalar `step`s and the manifest are small beside them.
    """
    root = as_location(root)
    problem = _probe(root)
    free = storage_for(root).free_bytes(root) if problem is None else 0
    # by full-model name: a tensor replicated over dp (or held whole by several ranks) counts once
    sizes = {name: t.numel() * t.element_size() for name, t in model_state(model).stored.items()}
    everyone: list[Any] = [None] * dist.get_world_size(group)
    # every rank's findings on every rank, so that all decide alike and raise together
    dist.all_gather_object(everyone, (problem, free, sizes), group=group)
    by_problem: dict[str, list[int]] = {}
    for rank, (p, _, _) in enumerate(everyone):
        if p is not None:
            by_problem.setdefault(p, []).append(rank)
    problems = [f"{_ranks(ranks)}: {p}" for p, ranks in sorted(by_problem.items())]
    model_bytes = sum({n: b for _, _, s in everyone for n, b in s.items()}.values())
    frees = [f for _, f, _ in everyone]
    least = None if None in frees else min(frees)
    return RootCheck(problems, least, model_bytes * (1 + moments))

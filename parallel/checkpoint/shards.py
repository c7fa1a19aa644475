"""Writing one part (model or optim): which rank writes which chunk, each rank's file streamed to
disk, and every rank's agreement that every file of the part reached the disk whole.

Which rank writes what is decided as dcp.save decides it, with DCP's own helpers:
`_create_write_items` gives each tensor's chunk (a DTensor shard's offsets in the full tensor) and
`dedup_save_plans` hands each chunk that several ranks hold (a replicated tensor) to one of them.
The rest of dcp.save is replaced, because it was most of a save's time (BENCHMARKS.md §3): its
per-item staging and in-memory file (stream.py writes from the tensors' memory instead), and its
writer threads, whose errors torch 2.13 loses (here each rank checks its file and the ranks
agree). Files are named as DCP's HuggingFaceStorageWriter names them (save_distributed=True).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
from torch.distributed.checkpoint._hf_utils import _gen_file_name
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import _create_write_items

from parallel.checkpoint.backends import storage_for
from parallel.checkpoint.state import CheckpointError
from parallel.checkpoint.storage import Location
from parallel.checkpoint.stream import Entry, FileRecord, incomplete, write_safetensors
from parallel.dtensor import local_part

__all__ = ["Part", "plan_part", "write_part"]


@dataclass
class Part:
    """One part's tensors on this rank: DCP's write items and each name's local tensor."""

    items: list[WriteItem]  # one per chunk held here (a DTensor's shard, or a whole tensor)
    local: dict[str, torch.Tensor]  # name -> this rank's values (a DTensor's local shard)


def plan_part(tensors: dict[str, torch.Tensor]) -> Part:
    """The write items of `tensors` (DTensors or plain) and their local values; no collective."""
    items = [item for name, t in tensors.items() for item in _create_write_items(name, t)]
    return Part(items, {name: local_part(t) for name, t in tensors.items()})


def _entries(part: Part, items: list[WriteItem]) -> list[Entry]:
    """The file entries of this rank's items, each checked against its local tensor."""
    entries = []
    for item in items:
        chunk = item.tensor_data.chunk if item.tensor_data is not None else None
        local = part.local[item.index.fqn]
        if item.type == WriteItemType.BYTE_IO or chunk is None:
            raise CheckpointError(f"{item.index.fqn!r} is not a tensor")
        if tuple(chunk.sizes) != tuple(local.shape):
            raise CheckpointError(
                f"{item.index.fqn!r}: local shard {list(local.shape)}, DCP's chunk {chunk}"
            )
        entries.append(Entry(item.index.fqn, local, tuple(chunk.offsets)))
    return entries


def write_part(
    directory: Location, part: Part, group: dist.ProcessGroup | None = None
) -> dict[str, FileRecord]:
    """Write this rank's share of `part` into `directory`; its files by name, each checked whole.

    A collective over `group`; raises CheckpointError on every rank when any rank's write failed.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    plans: list[Any] = [None] * world
    # every rank's chunks, so that each chunk several ranks hold is written once (as dcp.save)
    dist.all_gather_object(plans, SavePlan(part.items), group=group)
    mine = dedup_save_plans(plans)[rank].items
    records: dict[str, FileRecord] = {}
    problems = []
    if mine:  # a rank left nothing writes no file, as DCP's writer
        name = _gen_file_name(1, 1, rank + 1)  # shard index = group rank + 1, as DCP's
        try:
            path = storage_for(directory).join(directory, name)
            records[name] = write_safetensors(path, _entries(part, mine))
        except CheckpointError as err:
            problems.append(f"rank {dist.get_rank()}: {err}")
    problems += [
        f"rank {dist.get_rank()} could not write {p}"
        for r in records.values()
        if (p := incomplete(r)) is not None
    ]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, problems, group=group)  # every rank fails together or none
    if failed := sorted({p for rank_problems in everyone for p in rank_problems}):
        raise CheckpointError("; ".join(failed))
    return records

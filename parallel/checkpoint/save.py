"""Saving a checkpoint: per-rank safetensors files DCP's reader loads, an atomic commit.

A save writes into root/.tmp-step-XXXXXXXX and rank 0 renames it once every shard and the
manifest are on disk, so a directory named step-* with a manifest.json is always complete
(the layout and the manifest's entries: parallel/checkpoint/format.py). On fsspec storage the
save writes into step-XXXXXXXX itself and the manifest, written last, commits it (storage.py).

Written by hand, because DCP's safetensors storage does not do it: the manifest (that storage
holds only tensors; a non-tensor entry would be written raw in front of the safetensors data),
the CRC32s (DCP keeps no checksums; stream.py), the check that every file was written whole
(shards.py), the ranks' agreement on the outcome, and the tmp-dir commit (commit.py). The
files themselves are streamed by stream.py in the layout DCP's HF writer uses (why: shards.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from models.args import ModelArgs
from parallel.checkpoint.backends import storage_for
from parallel.checkpoint.commit import UNTOUCHED, clear_tmp, discard, write_and_commit
from parallel.checkpoint.format import (
    FORMAT,
    MANIFEST,
    checkpoint_name,
    file_crc32,
    model_entry,
    shard_files,
)
from parallel.checkpoint.shards import Part, plan_part, write_part
from parallel.checkpoint.state import (
    CheckpointError,
    ModelParts,
    model_state,
    optimizer_state,
    param_group_settings,
    rng_state,
)
from parallel.checkpoint.storage import Location, as_location
from parallel.checkpoint.stream import FileRecord

__all__ = ["CheckpointMeta", "save_checkpoint"]


@dataclass
class CheckpointMeta:
    """The JSON facts a manifest records beside the tensors (what the saver knows, not torch)."""

    model: ModelArgs  # the architecture: an export or a reader needs no config to rebuild it
    layout: dict[str, Any]  # dp, pp, tp, ...: a load in the same layout keeps per-rank RNG
    config: dict[str, Any] = field(default_factory=dict)  # the saver's; never read here
    tokens_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # the saver's own; load returns it


@dataclass
class Snapshot:
    """Everything one checkpoint holds, taken between steps: tensors and the JSON manifest."""

    root: Location
    step: int
    manifest: dict[str, Any]
    model: Part  # the tensors to write: live ones, or copies an async save staged
    optim: Part
    rng: dict[str, Any]


def take_snapshot(
    root: Location,
    step: int,
    model: ModelParts,
    optimizer: torch.optim.Optimizer,
    states: Mapping[str, Stateful],
    meta: CheckpointMeta,
) -> Snapshot:
    """The checkpoint of the current step: the manifest, and the live tensors (not copies)."""
    root = as_location(root)
    # built (and JSON-checked) on every rank, before any collective, so a bad value fails everywhere
    manifest = {
        "format": FORMAT,
        "step": step,
        "tokens_seen": meta.tokens_seen,
        "torch_version": torch.__version__,
        "model": model_entry(meta.model),
        "layout": meta.layout,
        "config": meta.config,
        "states": {name: obj.state_dict() for name, obj in states.items()},
        "optimizer_param_groups": param_group_settings(optimizer),
        "extra": meta.extra,
    }
    try:
        # a JSON round trip: checks it, and detaches it from live objects an async save outlives
        manifest = json.loads(json.dumps(manifest))
    except TypeError as err:
        raise CheckpointError(
            f"{storage_for(root).join(root, checkpoint_name(step))}: manifest entry is not JSON-serializable: {err}"
        ) from None
    model_part = plan_part(model_state(model).stored)
    optim_part = plan_part(optimizer_state(model, optimizer).stored)
    return Snapshot(root, step, manifest, model_part, optim_part, rng_state())


def write_snapshot(
    snap: Snapshot, keep: int | None = None, group: dist.ProcessGroup | None = None
) -> Location:
    """Write and commit a snapshot; a collective over `group` (default: all ranks).

    Raises CheckpointError on every rank together when any rank's part could not be written or
    rank 0 could not commit; what it wrote is then removed and earlier checkpoints untouched.
    Async saves run this in a background thread on a private gloo group, so its collectives
    never interleave with training's.
    """
    root, name = snap.root, checkpoint_name(snap.step)
    storage = storage_for(root)
    final, tmp = storage.join(root, name), storage.staging(root, name)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    failed = f"cannot save checkpoint step {snap.step} into {root}"
    # a store that writes in place (no atomic rename) cannot replace a committed checkpoint
    # without un-committing it first: the same step saved again (e.g. right after resuming
    # from it) keeps the committed one, the same training state, rather than risk losing it
    in_place = str(tmp) == str(final)
    committed = rank == 0 and in_place and storage.is_file(storage.join(final, MANIFEST))
    if _from_rank0(committed, group):
        return final
    # rank 0's verdict on clearing tmp: no rank writes into it before, none at all if it failed
    if problem := _from_rank0(clear_tmp(root, tmp) if rank == 0 else None, group):
        raise CheckpointError(f"{failed}: {problem}")
    written: dict[str, FileRecord] = {}  # file (relative to tmp) -> what this rank wrote to it
    try:
        for kind, part in (("model", snap.model), ("optim", snap.optim)):
            records = write_part(storage.join(tmp, kind), part, group)  # fails on all alike
            written.update({f"{kind}/{n}": r for n, r in records.items()})
    except CheckpointError as err:
        problem = str(err)
    dist.barrier(group)  # every shard is on disk before anyone lists the directory
    files: dict[str, dict[str, int]] = {}
    if problem is None:
        try:
            files = _file_entries(tmp, written, rank, world)
        except OSError as err:
            problem = (
                f"rank {dist.get_rank()} cannot read back {err.filename}: {err.strerror or err}"
            )
    gathered: list[Any] = [None] * world if rank == 0 else []
    # rank 0 collects every rank's RNG state, its share of the file checksums and its problem
    dist.gather_object(
        {"rng": snap.rng, "files": files, "problem": problem},
        gathered if rank == 0 else None,
        dst=_global(0, group),
        group=group,
    )
    outcome = None
    if rank == 0:
        problems = sorted({g["problem"] for g in gathered if g["problem"] is not None})
        outcome = (
            f"{failed}: " + "; ".join(problems) + UNTOUCHED
            if problems
            else write_and_commit(snap.manifest, gathered, root, tmp, final, keep, failed)
        )
        discard(tmp, final)  # a failed save leaves nothing behind
    # rank 0's verdict on the commit: every rank goes on, or every rank raises the same error
    if outcome := _from_rank0(outcome, group):
        raise CheckpointError(outcome)
    return final


def save_checkpoint(
    root: Location,
    step: int,
    model: ModelParts,
    optimizer: torch.optim.Optimizer,
    states: Mapping[str, Stateful],
    meta: CheckpointMeta,
    keep: int | None = None,
) -> Location:
    """Save model, optimizer, `states` (each's state_dict()) and `meta` as checkpoint `step`.

    Every rank must call it. Returns the committed directory. keep: how many complete
    checkpoints to retain (None = all).
    """
    return write_snapshot(take_snapshot(root, step, model, optimizer, states, meta), keep)


T = TypeVar("T")


def _global(group_rank: int, group: dist.ProcessGroup | None) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


def _from_rank0(value: T, group: dist.ProcessGroup | None) -> T:
    """Rank 0's value on every rank of `group`."""
    box = [value]
    dist.broadcast_object_list(box, src=_global(0, group), group=group)
    return box[0]


def _file_entries(
    tmp: Location, written: dict[str, FileRecord], rank: int, world: int
) -> dict[str, dict[str, int]]:
    """Bytes and CRC32 of the files this rank wrote (and its share of any no rank claims)."""
    # CRCs as written; a file no rank claims (none is expected: the writers made every file in
    # tmp) is read back, so the manifest never lists a file without its checksum
    unclaimed = [f for f in shard_files(tmp) if f not in written]
    entries = {f: {"bytes": r.meant, "crc32": r.crc} for f, r in written.items()}
    storage = storage_for(tmp)
    for f in unclaimed[rank::world]:
        path = storage.join(tmp, *f.split("/"))
        size = storage.size(path)
        if size is None:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        entries[f] = {"bytes": size, "crc32": file_crc32(path)}
    return entries

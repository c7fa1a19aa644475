"""Saving a checkpoint: per-shard safetensors via torch.distributed.checkpoint, an atomic commit.

A save writes into root/.tmp-step-XXXXXXXX and rank 0 renames it once every shard and the
manifest are on disk, so a directory named step-* with a manifest.json is always complete
(the layout and the manifest's entries: parallel/checkpoint/format.py).

Written by hand, because DCP's safetensors storage does not do it: the manifest (that storage
holds only tensors; a non-tensor entry would be written raw in front of the safetensors data),
the CRC32s (DCP keeps no checksums), and the tmp-dir commit and `latest` pointer.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from models.llama import ModelArgs
from parallel.checkpoint.format import (
    FORMAT,
    LATEST,
    MANIFEST,
    TMP_PREFIX,
    checkpoint_name,
    complete_checkpoints,
    file_crc32,
    model_entry,
    shard_files,
)
from parallel.checkpoint.state import (
    CheckpointError,
    ModelParts,
    model_state,
    optimizer_state,
    param_group_settings,
    rng_state,
)
from parallel.dtensor import local_part

__all__ = ["CheckpointMeta", "save_checkpoint"]


@dataclass
class CheckpointMeta:
    """The JSON facts a manifest records beside the tensors (what the saver knows, not torch)."""

    model: ModelArgs  # the architecture: an export or a reader needs no config to rebuild it
    layout: dict[str, Any]  # dp, pp, tp, ...: a load in the same layout keeps per-rank RNG
    config: dict[str, Any] = field(default_factory=dict)  # the saver's; never read here
    tokens_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # the saver's own; load returns it


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary name and os.replace, so readers see the old or the new file."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


WRITER_THREADS = 2  # files written in parallel per rank: serializing a file is CPU-bound


class _Crc32Stream(io.RawIOBase):
    """A write-only file that checksums the bytes on their way to disk (no read-back)."""

    def __init__(self, raw: io.IOBase) -> None:
        super().__init__()
        self.raw, self.crc = raw, 0

    def write(self, data: Any) -> int:
        """Checksum, then write through."""
        self.crc = zlib.crc32(data, self.crc)  # releases the GIL for large buffers
        return self.raw.write(data)

    def writable(self) -> bool:
        """Yes."""
        return True

    def tell(self) -> int:
        """Position in the underlying file."""
        return self.raw.tell()

    def fileno(self) -> int:
        """The underlying descriptor (DCP fsyncs it)."""
        return self.raw.fileno()

    def flush(self) -> None:
        """Flush the underlying file."""
        self.raw.flush()


class _Crc32FileSystem(FileSystem):
    """DCP's local file system, recording each written file's CRC32 as `<part>/<name>`.

    DCP's safetensors writer sends each file as one sequential stream (no seeks), so the CRC of
    what passed through equals the file's; loading re-checks it against the bytes on disk.
    """

    def __init__(self, part: str, crcs: dict[str, int]) -> None:
        super().__init__()
        self.part, self.crcs = part, crcs

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        """Wrap write streams; reads pass through."""
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _Crc32Stream(raw)
            yield stream
            raw.flush()
            self.crcs[f"{self.part}/{Path(path).name}"] = stream.crc  # writer threads: GIL-atomic


@dataclass
class Snapshot:
    """Everything one checkpoint holds, taken between steps: tensors and the JSON manifest."""

    root: Path
    step: int
    manifest: dict[str, Any]
    model: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    rng: dict[str, Any]


def _staged(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies that training may not touch (DTensors keep their mesh and placements)."""
    out = {}
    for name, t in tensors.items():
        local = local_part(t).detach().to("cpu", copy=True)
        out[name] = (DTensor.from_local(local, t.device_mesh, t.placements, run_check=False,
                                        shape=t.shape, stride=t.stride())
                     if isinstance(t, DTensor) else local)
    return out


def take_snapshot(
    root: Path, step: int, model: ModelParts, optimizer: torch.optim.Optimizer,
    states: Mapping[str, Stateful], meta: CheckpointMeta, copy: bool = False,
) -> Snapshot:
    """The checkpoint of the current step; copy=True stages CPU copies (for async saves)."""
    root = Path(root)
    # built (and JSON-checked) on every rank, before any collective, so a bad value fails everywhere
    manifest = {
        "format": FORMAT, "step": step, "tokens_seen": meta.tokens_seen,
        "torch_version": torch.__version__, "model": model_entry(meta.model),
        "layout": meta.layout, "config": meta.config,
        "states": {name: obj.state_dict() for name, obj in states.items()},
        "optimizer_param_groups": param_group_settings(optimizer), "extra": meta.extra,
    }
    try:
        # a JSON round trip: checks it, and detaches it from live objects an async save outlives
        manifest = json.loads(json.dumps(manifest))
    except TypeError as err:
        raise CheckpointError(f"{root / checkpoint_name(step)}: manifest entry is not "
                              f"JSON-serializable: {err}") from None
    model_tensors = model_state(model).tensors
    optim_tensors = optimizer_state(model, optimizer).tensors
    if copy:
        model_tensors, optim_tensors = _staged(model_tensors), _staged(optim_tensors)
    return Snapshot(root, step, manifest, model_tensors, optim_tensors, rng_state())


def write_snapshot(
    snap: Snapshot, keep: int | None = None, group: dist.ProcessGroup | None = None
) -> Path:
    """Write and commit a snapshot; a collective over `group` (default: all ranks).

    Async saves run this in a background thread on a private gloo group, so its collectives
    never interleave with training's.
    """
    root, name = snap.root, checkpoint_name(snap.step)
    final, tmp = root / name, root / f"{TMP_PREFIX}{name}"
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a killed save
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
    dist.barrier(group)  # no rank writes into tmp before rank 0 has cleared it
    written: dict[str, int] = {}  # file (relative to tmp) -> CRC32 of the bytes this rank wrote
    for part, tensors in (("model", snap.model), ("optim", snap.optim)):
        writer = HuggingFaceStorageWriter(str(tmp / part), save_distributed=True,
                                          thread_count=WRITER_THREADS)
        writer.fs = _Crc32FileSystem(part, written)
        dcp.save(tensors, storage_writer=writer, process_group=group)
    dist.barrier(group)  # every shard is on disk before anyone lists the directory
    files = shard_files(tmp)
    # CRCs as written; a file no rank wrote through the writer (none in torch 2.13) is read back
    unclaimed = [f for f in files if f not in written]
    mine = {f: {"bytes": (tmp / f).stat().st_size,
                "crc32": written[f] if f in written else file_crc32(tmp / f)}
            for f in [f for f in files if f in written] + unclaimed[rank::world]}
    gathered: list[Any] = [None] * world if rank == 0 else []
    # rank 0 collects every rank's RNG state and its share of the file checksums
    dist.gather_object({"rng": snap.rng, "files": mine}, gathered if rank == 0 else None,
                       dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if rank == 0:
        manifest = dict(snap.manifest)
        manifest["rng"] = _dedup_rng([g["rng"] for g in gathered])
        infos = {f: info for g in gathered for f, info in g["files"].items()}
        manifest["files"] = {f: infos[f] for f in sorted(infos)}
        _write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        _commit(root, tmp, final, keep)
    dist.barrier(group)  # no rank goes on (or exits) before the checkpoint is committed
    return final


def save_checkpoint(
    root: Path, step: int, model: ModelParts, optimizer: torch.optim.Optimizer,
    states: Mapping[str, Stateful], meta: CheckpointMeta, keep: int | None = None,
) -> Path:
    """Save model, optimizer, `states` (each's state_dict()) and `meta` as checkpoint `step`.

    Every rank must call it. Returns the committed directory. keep: how many complete
    checkpoints to retain (None = all).
    """
    return write_snapshot(take_snapshot(root, step, model, optimizer, states, meta), keep)


def _dedup_rng(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Each distinct RNG state once plus, per rank, which one: ranks seeded alike share a state,
    so the manifest stays small at thousands of ranks."""
    states: list[dict[str, Any]] = []
    keys: list[str] = []
    of_rank = []
    for state in per_rank:
        key = json.dumps(state, sort_keys=True)
        if key not in keys:
            keys.append(key)
            states.append(state)
        of_rank.append(keys.index(key))
    return {"states": states, "of_rank": of_rank}


def _commit(root: Path, tmp: Path, final: Path, keep: int | None) -> None:
    """Rename tmp into place, move `latest`, then drop checkpoints beyond the newest `keep`."""
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after resuming): swap it out
        trash = root / f"{TMP_PREFIX}old-{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    _write_text(root / LATEST, final.name + "\n")
    if keep is not None and keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            if old != final:
                shutil.rmtree(old)

"""Distributed checkpoints: per-shard safetensors via torch.distributed.checkpoint, atomic commits,
exact resume, and loading into any (dp, pp, tp, v) layout.

    root/step-00000100/
        model/shard-0000R-model-00001-of-00001.safetensors   one file per writing rank (DCP)
        optim/shard-0000R-model-00001-of-00001.safetensors   optimizer tensors (<name>.exp_avg, ...)
        manifest.json     step, config, layout, sampler, lr schedule, RNG, file sizes/CRCs; LAST
    root/latest           "step-00000100": moved only after a complete save (for people and tools)

A save writes into root/.tmp-step-XXXXXXXX and rank 0 renames it once every shard and the
manifest are on disk, so a directory named step-* with a manifest.json is always complete.

Written by hand, because DCP's safetensors storage does not do it: the manifest (that storage
holds only tensors; a non-tensor entry would be written raw in front of the safetensors data),
the CRC32s (DCP keeps no checksums), and the tmp-dir commit and `latest` pointer.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import (
    HuggingFaceStorageWriter,
)
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.tensor import DTensor

from parallel.checkpoint.state import (
    CheckpointError,
    model_state,
    optimizer_state,
    param_group_settings,
    rng_state,
)

if TYPE_CHECKING:
    from launcher.run.trainer import Trainer

__all__ = ["AsyncCheckpointer", "CheckpointError", "find_latest", "resume_path", "save_checkpoint"]

FORMAT = "tridist-checkpoint-1"
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
PARTS = ("model", "optim")  # one DCP save each, into a subdirectory of that name


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"{STEP_PREFIX}{step:08d}"


def _step_of(path: Path) -> int | None:
    digits = path.name.removeprefix(STEP_PREFIX)
    return int(digits) if path.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def _complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints under root, oldest first (.tmp dirs and manifest-less ones skipped)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _step_of(p) is not None and (p / MANIFEST).is_file()]
    return sorted(found, key=_step_of)


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root, or None.

    Scans the step-* directories rather than trusting `latest`: a job killed between the
    rename and the pointer update leaves `latest` one checkpoint behind (or missing).
    """
    complete = _complete_checkpoints(Path(root))
    return complete[-1] if complete else None


def resume_path(resume: str, root: Path | None) -> Path | None:
    """What `train.resume` names: none -> None; auto -> the newest checkpoint under root (None if
    there is none yet); a path -> that checkpoint, or the newest one under a checkpoint root."""
    if resume == "none" or (resume == "auto" and root is None):
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(resume)
    if (path / MANIFEST).is_file():
        return path
    if (latest := find_latest(path)) is None:
        raise CheckpointError(f"train.resume={resume}: no complete checkpoint (with {MANIFEST}) "
                              "there")
    return latest


def layout_of(trainer: Trainer) -> dict[str, Any]:
    """The (dp, pp, tp, v, schedule) a trainer runs, as saved in the manifest."""
    par = trainer.cfg.parallel
    return {"world_size": dist.get_world_size(), "dp": par.dp, "pp": par.pp, "tp": par.tp,
            "virtual_stages": par.virtual_stages, "schedule": par.schedule,
            "dp_shard": par.dp_shard}


def file_crc32(path: Path) -> int:
    """CRC32 of a file's bytes, read in 16 MiB blocks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def shard_files(directory: Path) -> list[str]:
    """Every file of the DCP parts, relative to `directory`, in one order all ranks agree on."""
    return sorted(str(p.relative_to(directory)) for part in PARTS
                  for p in (directory / part).glob("*") if p.is_file())


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
        if isinstance(t, DTensor):
            local = t.to_local().detach().to("cpu", copy=True)
            out[name] = DTensor.from_local(local, t.device_mesh, t.placements, run_check=False,
                                           shape=t.shape, stride=t.stride())
        else:
            out[name] = t.detach().to("cpu", copy=True)
    return out


def take_snapshot(
    root: Path, trainer: Trainer, extra: dict[str, Any] | None = None, copy: bool = False
) -> Snapshot:
    """The checkpoint of trainer's current step; copy=True stages CPU copies (for async saves)."""
    root = Path(root)
    # built (and JSON-checked) on every rank, before any collective, so a bad value fails everywhere
    manifest = {
        "format": FORMAT, "step": trainer.step,
        "tokens_seen": trainer.sampler.samples_consumed * trainer.sampler.seq_len,
        "torch_version": torch.__version__, "layout": layout_of(trainer),
        "config": dataclasses.asdict(trainer.cfg), "sampler": trainer.sampler.state_dict(),
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "optimizer_param_groups": param_group_settings(trainer.optimizer), "extra": extra or {},
    }
    try:
        json.dumps(manifest)
    except TypeError as err:
        raise CheckpointError(f"{root / checkpoint_name(trainer.step)}: manifest entry is not "
                              f"JSON-serializable: {err}") from None
    model = model_state(trainer.model).tensors
    optim = optimizer_state(trainer.model, trainer.optimizer).tensors
    if copy:
        model, optim = _staged(model), _staged(optim)
    return Snapshot(root, trainer.step, manifest, model, optim, rng_state())


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
        files = {f: info for g in gathered for f, info in g["files"].items()}
        manifest["files"] = {f: files[f] for f in sorted(files)}
        _write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        _commit(root, tmp, final, keep)
    dist.barrier(group)  # no rank goes on (or exits) before the checkpoint is committed
    return final


def save_checkpoint(
    root: Path, trainer: Trainer, extra: dict[str, Any] | None = None, keep: int | None = None
) -> Path:
    """Save model, optimizer and training state at trainer.step; every rank must call it.

    Returns the committed directory. keep: how many complete checkpoints to retain (None = all).
    """
    return write_snapshot(take_snapshot(root, trainer, extra), keep)


class AsyncCheckpointer:
    """Saves in a background thread: the step loop blocks only while tensors are copied to CPU.

    Written by hand around the synchronous save rather than with dcp.async_save, because the
    commit (CRCs, manifest, rename, `latest`) must follow the write as one unit; the thread uses
    a private gloo group, which every rank creates here in the same order.
    """

    def __init__(self) -> None:
        self._group = dist.new_group(backend="gloo")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[Path] | None = None

    def save(self, root: Path, trainer: Trainer, extra: dict[str, Any] | None = None,
             keep: int | None = None) -> float:
        """Start saving trainer's current step; returns the seconds the caller was blocked."""
        start = time.perf_counter()
        self.wait()  # one save in flight at a time
        snap = take_snapshot(root, trainer, extra, copy=True)
        self._pending = self._pool.submit(write_snapshot, snap, keep, self._group)
        return time.perf_counter() - start

    def wait(self) -> Path | None:
        """Block until the save in flight is committed (re-raising its error); its directory."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        """Finish the save in flight and stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown()


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
        for old in _complete_checkpoints(root)[:-keep]:
            if old != final:
                shutil.rmtree(old)

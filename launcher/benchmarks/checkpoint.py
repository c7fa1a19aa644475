"""`python -m launcher.bench checkpoint`: checkpoint save/load throughput against raw disk I/O.

Side by side in one run, on the same disk and the same number of bytes: tridist's save (model
+ optimizer, per-shard safetensors, CRCs, atomic commit) against every rank writing its share
of those bytes to a plain file (fsynced, as DCP's writer fsyncs), and tridist's load (same
layout, and resharded to another layout) against every rank reading its share back. The page
cache is dropped before each read when the process may (root), so reads come from the disk.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.run.build import build_trainer, load_data
from launcher.run.checkpointing import load_trainer, save_trainer, save_trainer_async
from launcher.run.compose import compose_config
from launcher.run.ports import free_port, local_rank_env
from launcher.run.trainer import Trainer
from parallel.checkpoint.async_save import AsyncCheckpointer
from parallel.checkpoint.format import checkpoint_name, read_manifest

BLOCK = 64 << 20
ASYNC = "async save"


@dataclass
class IoRow:
    """One measurement: what ran, the bytes it moved, and seconds for tridist and for raw I/O."""

    what: str
    layout: str
    nbytes: int
    tridist_s: float
    raw_s: float
    detail: str = ""  # async rows: where the blocked time went

    @property
    def ratio(self) -> float:
        """tridist throughput / raw throughput (1.0 = as fast as the disk allows)."""
        return self.raw_s / self.tridist_s


def drop_page_cache() -> bool:
    """Flush and drop the page cache so the next read comes from disk; False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def raw_write(path: Path, nbytes: int) -> float:
    """Seconds to write nbytes sequentially to a new file and fsync it."""
    block = torch.randint(0, 255, (BLOCK,), dtype=torch.uint8).numpy().tobytes()
    start = time.perf_counter()
    with open(path, "wb") as f:
        for offset in range(0, nbytes, BLOCK):
            f.write(block[: min(BLOCK, nbytes - offset)])
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def raw_read(path: Path) -> float:
    """Seconds to read a file sequentially."""
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(BLOCK):
            pass
    return time.perf_counter() - start


def _timed_all(fn: Callable[..., object], *args: object) -> float:
    """fn(*args) started together on every rank; seconds until the slowest rank is done."""
    dist.barrier()
    start = time.perf_counter()
    fn(*args)
    elapsed = torch.tensor(time.perf_counter() - start)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # an I/O step ends with its slowest rank
    return elapsed.item()


def _cold() -> None:
    if dist.get_rank() == 0:
        drop_page_cache()
    dist.barrier()


def _rank(
    rank: int,
    world: int,
    port: int,
    overrides: list[str],
    root: str,
    saved: str | None,
    queue: mp.SimpleQueue,
) -> None:
    os.environ.update(local_rank_env(rank, world, port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = compose_config(overrides, world)
    trainer = build_trainer(cfg, load_data(cfg))
    trainer.train_step()  # real optimizer state (AdamW's two moments)
    layout = f"dp={cfg.parallel.dp} pp={cfg.parallel.pp} tp={cfg.parallel.tp}"
    rows, raw = [], Path(root) / f"raw-{rank}.bin"
    raw.parent.mkdir(parents=True, exist_ok=True)
    if saved is not None:  # load what another layout saved, against reading its bytes raw
        files = read_manifest(Path(saved))["files"]
        nbytes = sum(info["bytes"] for info in files.values())
        shard = nbytes // world
        if not raw.exists():
            raw_write(raw, shard)
        _cold()
        load_s = _timed_all(load_trainer, Path(saved), trainer, False)
        _cold()
        rows.append(IoRow("load, resharded", layout, nbytes, load_s, _timed_all(raw_read, raw)))
    # save in this layout, then load it back in the same layout
    save_s = _timed_all(save_trainer, Path(root) / "ckpt", trainer)
    path = Path(root) / "ckpt" / checkpoint_name(trainer.step)
    nbytes = sum(info["bytes"] for info in read_manifest(path)["files"].values())
    raw_s = _timed_all(raw_write, raw, nbytes // world)
    rows.append(IoRow("save", layout, nbytes, save_s, raw_s))
    _cold()
    rows.append(
        IoRow(
            "load, same layout", layout, nbytes, _timed_all(load_trainer, path, trainer, False), 0.0
        )
    )
    _cold()
    rows[-1].raw_s = _timed_all(raw_read, raw)
    rows += _async_saves(trainer, Path(root) / "async", layout, nbytes, save_s)
    if rank == 0:
        queue.put((rows, str(path)))
    dist.barrier()
    dist.destroy_process_group()


def _slowest(seconds: float) -> float:
    value = torch.tensor(seconds)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)  # the step loop waits for its slowest rank
    return value.item()


def _async_saves(trainer: Trainer, root: Path, layout: str, nbytes: int, sync_s: float) -> list:
    """Two async saves, each followed by a training step: the step loop's blocked seconds (in
    save(), then waiting for the copy at that step's optimizer step), against the sync save."""
    checkpointer, rows = AsyncCheckpointer(), []
    plain_step_s = _timed_all(trainer.train_step)
    for n in (1, 2):  # the first allocates the CPU buffers, the second reuses them
        in_save = _timed_all(save_trainer_async, checkpointer, root, trainer)
        before = checkpointer.blocked_s
        step_s = _timed_all(trainer.train_step)  # the copy runs during its forward/backward
        waited = _slowest(checkpointer.blocked_s - before)
        checkpointer.wait()  # written and committed before the next one starts
        detail = (
            f"{in_save:.2f} s in save() + {waited:.2f} s at the next optimizer step; "
            f"that step took {step_s:.2f} s (one without a save: {plain_step_s:.2f} s)"
        )
        rows.append(IoRow(f"{ASYNC} {n}", layout, nbytes, in_save + waited, sync_s, detail))
    checkpointer.close()
    return rows


def _spawn(world: int, overrides: list[str], root: Path, saved: str | None) -> tuple[list, str]:
    port = free_port()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(world, port, overrides, str(root), saved, queue), nprocs=world, join=True)
    return queue.get()


def checkpoint_io(root: Path, model: list[str], tp: int = 2) -> list[IoRow]:
    """Save/load on 1 rank, then load that checkpoint resharded at tp on `tp` ranks (and save)."""
    base = [
        *model,
        "train.seq_len=16",
        "train.global_batch_size=2",
        "train.sample_tokens=0",
        "device=cpu",
        "precision=fp32",
    ]
    root.mkdir(parents=True, exist_ok=True)
    try:
        rows, saved = _spawn(1, base, root / "one", None)
        more, _ = _spawn(tp, [*base, f"parallel.tp={tp}"], root / "tp", saved)
        return rows + more
    finally:
        shutil.rmtree(root, ignore_errors=True)


def format_checkpoint_io(rows: list[IoRow], cold: bool) -> str:
    """A markdown table of the rows."""
    lines = [
        "| what | layout | GB | tridist s | raw s | tridist GB/s | raw GB/s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.what.startswith(ASYNC):
            continue
        gb = r.nbytes / 1e9
        lines.append(
            f"| {r.what} | {r.layout} | {gb:.2f} | {r.tridist_s:.2f} | {r.raw_s:.2f} | "
            f"{gb / r.tridist_s:.2f} | {gb / r.raw_s:.2f} | {r.ratio:.2f} |"
        )
    reads = "cold (page cache dropped before each read)" if cold else "page cache NOT dropped"
    lines.append(f"\nreads: {reads}; ratio = tridist GB/s / raw GB/s\n")
    for r in rows:
        if r.what.startswith(ASYNC):
            lines.append(
                f"{r.what} ({r.layout}): the step loop blocked {r.tridist_s:.2f} s "
                f"({r.detail}), against {r.raw_s:.2f} s for a synchronous save"
            )
    return "\n".join(lines)

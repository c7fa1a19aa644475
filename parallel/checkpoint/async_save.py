"""Saving in the background: tensors are copied to CPU buffers, then written, off the step loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.hooks import RemovableHandle

from parallel.checkpoint.save import CheckpointMeta, Snapshot, take_snapshot, write_snapshot
from parallel.checkpoint.shards import Part
from parallel.checkpoint.state import CheckpointError, ModelParts
from parallel.checkpoint.storage import Location

__all__ = ["AsyncCheckpointer"]


class _Buffers:
    """CPU copies of one part's tensors, kept from save to save: a tensor of the same name, shape
    and dtype is copied into the memory it used last time (no fresh pages to fault in)."""

    def __init__(self) -> None:
        self._held: dict[str, torch.Tensor] = {}

    def stage(self, part: Part) -> Part:
        """`part` with its local tensors copied into the buffers (valid until the next stage)."""
        copies = {}
        for name, t in part.local.items():
            buf = self._held.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = self._held[name] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            copies[name] = buf.copy_(t.detach())
        return replace(part, local=copies)


class AsyncCheckpointer:
    """Saves in a background thread, which first copies the tensors to CPU, then writes.

    The step loop blocks in save() only for the state dicts and the manifest; the copy runs
    while the next step's forward and backward run, and that step's optimizer.step() (a step
    pre-hook registered here) waits until the copy is done, so the weights and moments never
    change under it. Anything else that writes them in place first calls wait_staged().
    The CPU buffers stay allocated for the next save (one copy of the state).

    Written by hand around the synchronous save rather than with dcp.async_save, because the
    commit (CRCs, manifest, rename, `latest`) must follow the write as one unit; the thread uses
    a private gloo group, which every rank creates here in the same order.
    """

    def __init__(self) -> None:
        self._group = dist.new_group(backend="gloo")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[Location] | None = None
        self._pending_step = 0
        self._staged = threading.Event()
        self._staged.set()  # nothing to stage yet
        self._buffers = (_Buffers(), _Buffers())  # model, optim
        self._hooked: tuple[torch.optim.Optimizer, RemovableHandle] | None = None
        self.blocked_s = 0.0  # in save() and waiting for the copies, since this was made

    def save(
        self,
        root: Location,
        step: int,
        model: ModelParts,
        optimizer: torch.optim.Optimizer,
        states: Mapping[str, Stateful],
        meta: CheckpointMeta,
        keep: int | None = None,
    ) -> float:
        """Start saving checkpoint `step` (as save_checkpoint); returns the seconds blocked here
        (the wait for the copies, at the next optimizer step, adds to blocked_s)."""
        start = time.perf_counter()
        self.wait()  # one save in flight at a time: its buffers are free again after this
        self._hook(optimizer)
        # the states' state_dict()s and the manifest are taken now; the tensors in the thread
        snap = take_snapshot(root, step, model, optimizer, states, meta)
        self._staged.clear()
        self._pending = self._pool.submit(self._stage_and_write, snap, keep)
        self._pending_step = step
        blocked = time.perf_counter() - start
        self.blocked_s += blocked
        return blocked

    def _stage_and_write(self, snap: Snapshot, keep: int | None) -> Location:
        try:
            model, optim = (b.stage(p) for b, p in zip(self._buffers, (snap.model, snap.optim)))
        finally:
            self._staged.set()  # a failed copy must not hold the step loop: wait() raises it
        return write_snapshot(replace(snap, model=model, optim=optim), keep, self._group)

    def _hook(self, optimizer: torch.optim.Optimizer) -> None:
        """Make `optimizer`'s step wait for the copies (once per optimizer)."""
        if self._hooked is not None and self._hooked[0] is optimizer:
            return
        if self._hooked is not None:
            self._hooked[1].remove()

        def before_step(*_: Any) -> None:
            self.wait_staged()

        self._hooked = (optimizer, optimizer.register_step_pre_hook(before_step))

    def wait_staged(self) -> float:
        """Block until the save in flight has copied its tensors (they may change after); the
        seconds waited."""
        if self._staged.is_set():
            return 0.0
        start = time.perf_counter()
        self._staged.wait()
        waited = time.perf_counter() - start
        self.blocked_s += waited
        return waited

    def raise_if_failed(self) -> None:
        """Raise the error of a save that has finished with one; never blocks (a Future check).

        Every rank's background save fails together (write_snapshot agrees on the outcome
        before it returns), so each rank raises within a step or so of the others.
        """
        pending = self._pending
        if pending is not None and pending.done() and pending.exception() is not None:
            self.wait()  # raises it, once

    def wait(self) -> Location | None:
        """Block until the save in flight is committed (its error as a CheckpointError); its
        directory, or None when none was in flight."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        except CheckpointError:
            raise
        except Exception as err:  # e.g. a collective of the save's group that broke
            raise CheckpointError(
                f"background save of step {self._pending_step} failed: {type(err).__name__}: {err}"
            ) from err

    def close(self) -> None:
        """Finish the save in flight, stop the thread and unhook the optimizer."""
        try:
            self.wait()
        finally:
            self._pool.shutdown()
            if self._hooked is not None:
                self._hooked[1].remove()
                self._hooked = None

"""Saving in the background: the step loop blocks only while tensors are copied to CPU."""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from parallel.checkpoint.save import CheckpointMeta, take_snapshot, write_snapshot
from parallel.checkpoint.state import CheckpointError, ModelParts

__all__ = ["AsyncCheckpointer"]


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
        self._pending_step = 0

    def save(
        self,
        root: Path,
        step: int,
        model: ModelParts,
        optimizer: torch.optim.Optimizer,
        states: Mapping[str, Stateful],
        meta: CheckpointMeta,
        keep: int | None = None,
    ) -> float:
        """Start saving checkpoint `step` (as save_checkpoint); returns the seconds blocked."""
        start = time.perf_counter()
        self.wait()  # one save in flight at a time
        # the states' state_dict()s and the manifest are taken now, with the tensor copies
        snap = take_snapshot(root, step, model, optimizer, states, meta, copy=True)
        self._pending = self._pool.submit(write_snapshot, snap, keep, self._group)
        self._pending_step = step
        return time.perf_counter() - start

    def raise_if_failed(self) -> None:
        """Raise the error of a save that has finished with one; never blocks (a Future check).

        Every rank's background save fails together (write_snapshot agrees on the outcome
        before it returns), so each rank raises within a step or so of the others.
        """
        pending = self._pending
        if pending is not None and pending.done() and pending.exception() is not None:
            self.wait()  # raises it, once

    def wait(self) -> Path | None:
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
        """Finish the save in flight and stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown()

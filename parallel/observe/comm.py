"""Every c10d call a rank makes, seen from Python: its wall time by phase (pp / dp / tp / cp /
other group) and the last operation started and completed, with its group and sequence number.

Counting itself is the process group's own: `ProcessGroup._get_sequence_number_for_group()`
grows by one per collective or p2p operation on gloo and NCCL alike, whoever issues it (FSDP2,
DTensor's functional collectives, pipelining, tridist), so the watchdog compares those. The
wrappers here only name the operation and time it: torch.distributed's functions (looked up by
module attribute at call time by FSDP2, pipelining and tridist) and `Work.wait`, where async
collectives (FSDP2's all-gathers, pipeline receives) are waited for. Wall time is what can be
measured without a host sync: on CPU/gloo it is the wait itself; on CUDA/NCCL a call returns once
enqueued, so waits for the GPU show up in the phase that synchronizes (documented, not hidden).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch.distributed as dist
import torch.distributed.pipelining.schedules as pipeline_schedules

# the torch.distributed functions a run reaches from Python (FSDP2, pipelining, DCP, tridist);
# not isend/irecv: P2POp checks `op is isend`, and pipelining's sends go through batch_isend_irecv
WRAPPED = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_single",
    "all_gather_into_tensor",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "batch_isend_irecv",
    "all_gather_object",
    "gather_object",
    "broadcast_object_list",
    "scatter_object_list",
    "send_object_list",
    "recv_object_list",
)


# pipelining's p2p: torch's schedules send and receive through this module function, which calls
# isend/irecv itself for all-send or all-receive batches (batch_isend_irecv only for mixed ones)
P2P = "_batch_p2p"


class Op(NamedTuple):
    """One c10d call: its name, its group's name and the group's sequence number after it."""

    name: str
    group: str
    seq: int
    at: float  # time.time() when it started or completed

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"op": self.name, "group": self.group, "seq": self.seq, "time": self.at}


def _group_of(name: str, args: tuple, kwargs: dict) -> Any:
    group = kwargs.get("group")
    if group is None and name in ("batch_isend_irecv", P2P) and args and args[0]:
        group = args[0][0].group
    return group if group is not None else dist.group.WORLD


class CommTracker:
    """Wraps torch.distributed's calls while installed; `seconds[phase]` accumulates their wall
    time (outermost call only: all_gather_object's inner all_gather is not counted twice)."""

    def __init__(self, phase_of_group: dict[str, str]) -> None:
        """phase_of_group: group name -> phase (e.g. the mesh's pp group -> "pp_wait"); any other
        group's calls count as "comm"."""
        self.phase_of_group = phase_of_group
        self.seconds: dict[str, float] = {}
        self.last_started: Op | None = None
        self.last_completed: Op | None = None
        self.in_call: str | None = None  # the op the main thread is inside, if any
        self._depth = threading.local()
        self._pending: dict[int, str] = {}  # id(Work) of an async call -> its phase
        self._originals: dict[str, Callable[..., Any]] = {}

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        lookup = P2P if name == "pipeline_p2p" else name
        depth, seconds, pending = self._depth, self.seconds, self._pending

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if getattr(depth, "n", 0):  # inside another wrapped call (all_gather_object's)
                return fn(*args, **kwargs)
            group = _group_of(lookup, args, kwargs)
            gname = getattr(group, "group_name", "?")
            phase = self.phase_of_group.get(gname, "comm")
            read = getattr(group, "_get_sequence_number_for_group", None)
            self.last_started = Op(name, gname, read() + 1 if read else -1, time.time())
            depth.n, self.in_call = 1, name
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start
                depth.n, self.in_call = 0, None
            if isinstance(out, dist.Work):  # async: waited for later, in Work.wait
                pending[id(out)] = phase
            elif isinstance(out, list):
                for work in out:
                    pending[id(work)] = phase
            self.last_completed = Op(name, gname, read() if read else -1, time.time())
            return out

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        wrapper.tracker = self  # type: ignore[attr-defined]
        return wrapper

    def _wrap_wait(self, wait: Callable[..., Any]) -> Callable[..., Any]:
        depth, seconds, pending = self._depth, self.seconds, self._pending

        def timed_wait(work: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(depth, "n", 0):  # a synchronous wrapped call waiting for its own work
                return wait(work, *args, **kwargs)
            phase = pending.pop(id(work), "comm")
            depth.n, self.in_call = 1, "wait"
            start = time.perf_counter()
            try:
                return wait(work, *args, **kwargs)
            finally:
                seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start
                depth.n, self.in_call = 0, None

        timed_wait.__wrapped__ = wait  # type: ignore[attr-defined]
        return timed_wait

    def install(self) -> None:
        """Replace the functions on torch.distributed (and Work.wait) with timed wrappers."""
        if self._originals:
            return
        left = getattr(dist.all_reduce, "tracker", None)
        if isinstance(left, CommTracker):  # a run that failed before uninstalling: undo it first
            left.uninstall()
        for name in WRAPPED:
            self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._originals[name]))
        self._originals[P2P] = getattr(pipeline_schedules, P2P)
        setattr(pipeline_schedules, P2P, self._wrap("pipeline_p2p", self._originals[P2P]))
        self._originals["Work.wait"] = dist.Work.wait
        dist.Work.wait = self._wrap_wait(dist.Work.wait)  # type: ignore[method-assign]

    def uninstall(self) -> None:
        """Put torch.distributed's own functions back."""
        wait = self._originals.pop("Work.wait", None)
        if wait is not None:
            dist.Work.wait = wait  # type: ignore[method-assign]
        p2p = self._originals.pop(P2P, None)
        if p2p is not None:
            setattr(pipeline_schedules, P2P, p2p)
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        self._originals.clear()
        self._pending.clear()

    def take(self) -> dict[str, float]:
        """The seconds per phase since the last take, and start again from zero."""
        out = dict(self.seconds)
        self.seconds.clear()  # in place: the wrappers hold this dict
        self._pending.clear()  # a work never waited for (e.g. fire-and-forget sends) is dropped
        return out

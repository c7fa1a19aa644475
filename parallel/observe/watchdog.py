"""A heartbeat thread per rank: past `timeout_s` without progress (a finished step, or any of its
process groups' sequence numbers moving) it raises a flag in the rendezvous store, every rank
posts its state there (step, per-group sequence numbers, last c10d operation, Python stacks via
faulthandler), the rank that raised the flag writes one JSON report naming the suspect ranks,
and every rank exits with HANG_EXIT_CODE (torchrun / Slurm restart from the last checkpoint).

The store is a side channel that works while a process group is stuck: its TCP client is not
the group's transport. Keys live under a prefix of the group's own store, which torchrun already
scopes per restart attempt, so a restarted job never reads an old attempt's flag.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from parallel.observe.comm import CommTracker

HANG_EXIT_CODE = 3
REPORT_NAME = "hang-report.json"
GRACE_S = 5.0  # how long the reporter waits for the other ranks' states
EXIT_DELAY_S = 1.0  # from the report to every rank's exit


def _not_alive() -> bool:
    return False


def suspects(states: dict[int, dict[str, Any]], world: int) -> tuple[list[int], list[dict]]:
    """The ranks most often out of step with their groups, and per group what is out of step.

    In each group the most common sequence number (ties: the higher one) is the operation the
    group is in; a member below it has not started that operation, one above it started a later
    one alone. A rank that posted no state at all (dead or frozen) is a suspect too."""
    groups: dict[str, dict[str, Any]] = {}
    for rank, state in states.items():
        for name, g in state["groups"].items():
            entry = groups.setdefault(
                name, {"group": name, "label": g["label"], "ranks": g["ranks"], "seq": {}}
            )
            entry["seq"][rank] = g["seq"]
    odd: Counter[int] = Counter()
    report = []
    for entry in groups.values():
        seqs = entry["seq"]
        counts = Counter(seqs.values())
        mode = max(counts, key=lambda s: (counts[s], s))
        behind = sorted(r for r, s in seqs.items() if s < mode)
        ahead = sorted(r for r, s in seqs.items() if s > mode)
        silent = sorted(set(entry["ranks"]) - set(seqs))
        if behind or ahead or silent:
            odd.update(behind + ahead)
            report.append({**entry, "waiting_at_seq": mode, "behind": behind, "ahead": ahead})
    silent_ranks = sorted(set(range(world)) - set(states))
    top = max(odd.values(), default=0)
    named = sorted(set(silent_ranks) | {r for r, n in odd.items() if n == top})
    return named, report


def _stacks() -> str:
    with tempfile.TemporaryFile("w+") as f:  # faulthandler writes to a file descriptor
        faulthandler.dump_traceback(f, all_threads=True)
        f.seek(0)
        return f.read()


class Watchdog(threading.Thread):
    """The heartbeat/watchdog thread of one rank; `beat(step)` from the training loop."""

    def __init__(
        self,
        store: dist.Store,
        groups: Callable[[], dict[str, Any]],
        labels: dict[str, str],
        tracker: CommTracker | None,
        folder: Path | None,
        timeout_s: float,
        poll_s: float = 1.0,
        exit_fn: Callable[[int], None] = os._exit,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        """groups: name -> ProcessGroup of every group this rank is in, now (groups made after
        the start, e.g. lazily by a library, count too), labels: name -> what it
        is (world, dp, pp, ...); folder: where the
        report goes (the run folder, shared by all ranks), None to print it only; alive: False
        once the watched code has ended by any way (an error included): the thread then stops."""
        super().__init__(name="tridist-watchdog", daemon=True)
        self.store = dist.PrefixStore("tridist/observe/", store)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.groups, self.labels, self.tracker, self.folder = groups, labels, tracker, folder
        self.timeout_s, self.poll_s, self.exit_fn, self.alive = timeout_s, poll_s, exit_fn, alive
        self.step = 0
        self._progress = time.monotonic()
        self._stopping = threading.Event()

    def beat(self, step: int) -> None:
        """A finished step (no I/O: the thread reads it)."""
        self.step = step
        self._progress = time.monotonic()

    def start(self) -> None:
        """Start the thread; the interpreter's exit closes it first if nothing else did."""
        # a daemon thread still inside a torch call (the store, a group's sequence number) when
        # the interpreter finalizes aborts the process: pybind re-takes the GIL in a noexcept
        # destructor, Python ends the thread there, and C++ calls std::terminate (SIGABRT)
        atexit.register(self.close)
        super().start()

    def close(self) -> None:
        """Stop watching (the end of the run, or before a long phase without steps), wait for
        the thread (it reads the process groups, which must outlive its last poll), and let go
        of what it watched."""
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10.0)
        atexit.unregister(self.close)
        # `alive` may hold the watched code's frame and so all its locals (the trainer, its
        # process groups): they must be freed when that code returns, not by the collector at
        # interpreter exit, where a gloo worker thread that still needs the GIL aborts the process
        self.alive = _not_alive

    def _seqs(self) -> dict[str, int]:
        return {n: g._get_sequence_number_for_group() for n, g in self.groups().items()}

    def run(self) -> None:
        """Poll: progress, the store's flag, the timeout."""
        try:
            self._watch()
        except Exception as err:  # e.g. the group destroyed under it after a failed run
            if not self._stopping.is_set():
                print(f"observe: watchdog stopped: {err}", file=sys.stderr, flush=True)

    def _watch(self) -> None:
        last = self._seqs()
        while not self._stopping.wait(self.poll_s):
            if not self.alive():
                return
            seqs = self._seqs()
            if seqs != last:
                last, self._progress = seqs, time.monotonic()
            if self.store.check(["hang"]):
                self._respond(reporter=False)
                return
            stalled = time.monotonic() - self._progress
            if stalled > self.timeout_s and not self._stopping.is_set():
                reporter = self.store.add("claims", 1) == 1  # the first rank to time out reports
                if reporter:
                    self.store.set("hang", json.dumps({"rank": self.rank, "stalled_s": stalled}))
                self._respond(reporter)
                return

    def _group_state(self, name: str, group: Any) -> dict[str, Any]:
        ranks = dist.get_process_group_ranks(group)
        label = self.labels.get(name) or ("world" if len(ranks) == self.world else "")
        return {"label": label, "ranks": ranks, "seq": group._get_sequence_number_for_group()}

    def state(self) -> dict[str, Any]:
        """What this rank posts: its step, groups, last operations and stacks."""
        t = self.tracker
        return {
            "rank": self.rank,
            "step": self.step,
            "seconds_since_progress": round(time.monotonic() - self._progress, 1),
            "groups": {n: self._group_state(n, g) for n, g in self.groups().items()},
            "in_call": t.in_call if t else None,
            "last_started": t.last_started.as_dict() if t and t.last_started else None,
            "last_completed": t.last_completed.as_dict() if t and t.last_completed else None,
            "stacks": _stacks(),
        }

    def _respond(self, reporter: bool) -> None:
        self.store.set(f"state/{self.rank}", json.dumps(self.state()))
        if reporter:
            self._report()
            # every rank exits at one moment: one that left early would wake the others' stuck
            # collectives with a connection error instead
            self.store.set("exit_at", str(time.time() + EXIT_DELAY_S))
        deadline = time.monotonic() + GRACE_S + 5  # the reporter itself may be gone
        while not self.store.check(["exit_at"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.store.check(["exit_at"]):
            time.sleep(max(0.0, float(self.store.get("exit_at")) - time.time()))
        self.exit_fn(HANG_EXIT_CODE)

    def _report(self) -> None:
        deadline = time.monotonic() + GRACE_S
        keys = [f"state/{r}" for r in range(self.world)]
        states: dict[int, dict[str, Any]] = {}
        while time.monotonic() < deadline and len(states) < self.world:
            for r, key in enumerate(keys):
                if r not in states and self.store.check([key]):
                    states[r] = json.loads(self.store.get(key))
            time.sleep(0.2)
        named, groups = suspects(states, self.world)
        report = {
            "timeout_s": self.timeout_s,
            "detected_by": self.rank,
            "suspect_ranks": named,
            "silent_ranks": sorted(set(range(self.world)) - set(states)),
            "groups": groups,
            "ranks": {str(r): states[r] for r in sorted(states)},
        }
        where = "printed only (no run folder)"
        if self.folder is not None:
            path = self.folder / REPORT_NAME
            path.write_text(json.dumps(report, indent=1))
            where = str(path)
        first = next((g for g in groups if g["behind"]), groups[0] if groups else None)
        at = (
            f"; group {first['group']} ({first['label']}, ranks {first['ranks']}) waits at sequence "
            f"{first['waiting_at_seq']}"
            if first
            else ""
        )
        print(
            f"hang: no progress for {self.timeout_s:g} s (observe.hang_timeout_s); suspect "
            f"rank(s) {named}{at}; report: {where}",
            file=sys.stderr,
            flush=True,
        )


def flight_recorder_env(folder: Path, buffer_entries: int = 2000) -> dict[str, str]:
    """The environment that turns on torch's NCCL flight recorder, dumping into `folder` on a
    timeout (set before init_process_group; the older and newer names of each variable)."""
    prefix = str(folder / "flight_recorder" / "rank_")
    return {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": str(buffer_entries),
        "TORCH_FR_BUFFER_SIZE": str(buffer_entries),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix,
        "TORCH_FR_DUMP_TEMP_FILE": prefix,
    }

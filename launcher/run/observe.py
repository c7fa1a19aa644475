"""What `observe:` and `profile:` add to a run: per-rank phase times and the straggler report
every `observe.interval` steps, the hang watchdog, NCCL's flight recorder, torch.profiler traces.

The loop calls `before_step` / `after_step` around each step, `checkpoint()` around a save and
`close()` at the end. Nothing here syncs the host with a device inside a step: phases are host
wall time (launcher/run/monitor.py measures data time the same way), and the interval's one
all_gather is the only collective added. Rank 0 writes observe.jsonl (every rank's seconds per
phase and scores) and adds a summary to the next logged step's record (metrics.jsonl, wandb,
TensorBoard); a straggler prints one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch.distributed as dist

from launcher.config import Config
from launcher.run.trainer import Trainer
from parallel.mesh import resolve_device
from parallel.observe.comm import CommTracker
from parallel.observe.phases import (
    PHASES_ALL,
    StragglerScores,
    gather_phase_times,
)
from parallel.observe.profile import StepProfiler
from parallel.observe.watchdog import Watchdog, flight_recorder_env

PHASE_OF_DIM = {"pp": "pp_wait", "dp": "dp_comm", "tp": "tp_comm", "cp": "cp_comm"}
OBSERVE_NAME = "observe.jsonl"


def prepare_environment(cfg: Config, run_dir: Path | None) -> None:
    """Before init_process_group: NCCL's flight recorder dumping into the run folder (CUDA runs
    with observe.flight_recorder; a variable the user set wins)."""
    o = cfg.observe
    if run_dir is None or not (o.enabled and o.flight_recorder):
        return
    if resolve_device(cfg.device).type != "cuda":
        return  # gloo has no flight recorder: the watchdog's report covers it
    (run_dir / "flight_recorder").mkdir(parents=True, exist_ok=True)
    for key, value in flight_recorder_env(run_dir).items():
        os.environ.setdefault(key, value)


def _groups_now() -> dict[str, Any]:
    """Every process group this rank is in, by name."""
    rank = dist.get_rank()
    return {
        name: pg
        for pg, name in list(dist.distributed_c10d._world.pg_names.items())
        if rank in dist.get_process_group_ranks(pg)
    }


def _my_groups(trainer: Trainer) -> tuple[dict[str, Any], dict[str, str]]:
    """Every process group this rank is in (name -> group), and what each is: the phase its
    calls count in when it spans the ranks of a mesh dim (pp_wait, dp_comm, ...; FSDP2's own
    groups over dp too), or "world"; other groups are left out of `labels`."""
    groups = _groups_now()
    mesh = trainer.model.mesh
    dims = {
        tuple(dist.get_process_group_ranks(mesh.get_group(d))): PHASE_OF_DIM[d]
        for d in mesh.mesh_dim_names or ()
        if mesh[d].size() > 1
    }
    world = tuple(range(dist.get_world_size()))
    labels = {}
    for name, pg in groups.items():
        ranks = tuple(dist.get_process_group_ranks(pg))
        label = dims.get(ranks, "world" if ranks == world else None)
        if label is not None:
            labels[name] = label
    return groups, labels


def _running(frame: FrameType) -> Callable[[], bool]:
    """Whether `frame` (the training loop's) is still on the main thread's stack: a loop that
    ended by an error never reaches close(), and its watchdog must not fire later in a process
    that goes on (a test session, a notebook). Drops the frame once it has ended."""
    main = threading.main_thread().ident
    held: list[FrameType] = [frame]

    def running() -> bool:
        current = sys._current_frames().get(main or -1)
        while held and current is not None:
            if current is held[0]:
                return True
            current = current.f_back
        held.clear()
        return False

    return running


class RunObserver:
    """Phase clock, straggler scores, watchdog and profiler of one run, built from the config."""

    def __init__(
        self,
        cfg: Config,
        trainer: Trainer,
        run_dir: Path | None,
        data_wait: Any,
        publish: Callable[[dict[str, Any]], None],
        say: Callable[[str], None],
        always: bool = False,
    ) -> None:
        """data_wait: an object whose `.seconds` grows by the time spent fetching batches;
        publish: takes the report's summary fields for the metrics sinks (the next logged step).
        Without a run folder (training called as a library) it observes nothing unless
        `always` (a benchmark measuring its cost): a library call adds no collective."""
        o, p = cfg.observe, cfg.profile
        self.enabled = o.enabled and (run_dir is not None or always)
        self.interval = o.interval
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run_dir, self.data_wait, self.publish, self.say = run_dir, data_wait, publish, say
        self.profiler = None
        if p.steps and run_dir is not None and self.rank in p.ranks:
            self.profiler = StepProfiler(
                run_dir, self.rank, p.steps[0], p.steps[1], trainer.device, p.memory
            )
        self.tracker: CommTracker | None = None
        self.watchdog: Watchdog | None = None
        self._file = None
        if not self.enabled:
            return
        _, labels = _my_groups(trainer)
        self.tracker = CommTracker({n: p for n, p in labels.items() if p in PHASE_OF_DIM.values()})
        self.tracker.install()
        self.scores = StragglerScores(self.world, o.straggler_score)
        self._seconds: dict[str, float] = {}
        self._steps = 0
        self._warm = False  # the first step (lazy allocation, compilation) is nobody's phase
        self._optimizer_s = 0.0
        self._hooks = [
            trainer.optimizer.register_step_pre_hook(self._optimizer_start),
            trainer.optimizer.register_step_post_hook(self._optimizer_end),
        ]
        self._file = (
            open(run_dir / OBSERVE_NAME, "a") if run_dir is not None and self.rank == 0 else None
        )
        if o.hang_timeout_s > 0:
            store = dist.distributed_c10d._get_default_store()
            self.watchdog = Watchdog(
                store,
                _groups_now,
                labels,
                self.tracker,
                run_dir,
                o.hang_timeout_s,
                alive=_running(sys._getframe(1)),
            )
            self.watchdog.beat(trainer.step)
            self.watchdog.start()

    def _optimizer_start(self, *_: Any) -> None:
        self._optimizer_t0 = time.perf_counter()

    def _optimizer_end(self, *_: Any) -> None:
        self._optimizer_s += time.perf_counter() - self._optimizer_t0

    def before_step(self, step: int) -> None:
        """The next step is `step` (1-based): start its clock (and the profiler at its range)."""
        if self.profiler is not None:
            self.profiler.before_step(step)
        if self.tracker is None:
            return
        self.tracker.take()  # calls between steps (logging, validation) are no step's phases
        self._optimizer_s = 0.0
        self._t0, self._data0 = time.perf_counter(), self.data_wait.seconds

    def after_step(self, step: int) -> None:
        """Add the step's phases; every interval, gather them from all ranks and report."""
        if self.profiler is not None:
            for path in self.profiler.after_step(step):
                self.say(f"profile: rank {self.rank} wrote {path}")
        if self.tracker is None:
            return
        total = time.perf_counter() - self._t0
        comm = self.tracker.take()
        data = self.data_wait.seconds - self._data0
        phases = {**comm, "data": data, "optimizer": self._optimizer_s}
        phases["compute"] = total - sum(phases.values())  # what is left: forward, backward, clip
        if self._warm:
            for name, seconds in phases.items():
                self._seconds[name] = self._seconds.get(name, 0.0) + seconds
            self._steps += 1
        self._warm = True
        if self.watchdog is not None:
            self.watchdog.beat(step)
        if step % self.interval == 0 and self._steps:  # the same steps on every rank
            self._report(step)

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[None]:
        """Time a checkpoint save as the interval's checkpoint phase."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.tracker is not None:
                self._seconds["checkpoint"] = (
                    self._seconds.get("checkpoint", 0.0) + time.perf_counter() - start
                )

    def _report(self, step: int) -> None:
        times = gather_phase_times(self._seconds, self._steps)  # collective: every rank
        first = step - self._steps + 1
        self._seconds, self._steps = {}, 0
        stragglers, relative, individual = self.scores.score(times)
        if self.rank != 0:
            return
        if stragglers:
            self.say(
                f"straggler at steps {first}-{step}: " + "; ".join(s.describe() for s in stragglers)
            )
        if self._file is not None:
            record = {
                "step": step,
                "first_step": first,
                "phase_s": {p: times[:, i].tolist() for i, p in enumerate(PHASES_ALL)},
                "relative": {p: relative[:, i].tolist() for i, p in enumerate(PHASES_ALL)},
                "individual": {p: individual[:, i].tolist() for i, p in enumerate(PHASES_ALL)},
                "stragglers": [s.__dict__ for s in stragglers],
            }
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._file is not None:
            summary: dict[str, Any] = {}
            for i, p in enumerate(PHASES_ALL):
                summary[f"phase/{p}_s_max"] = times[:, i].max().item()
                summary[f"phase/{p}_s_min"] = times[:, i].min().item()
            worst = min(stragglers, key=lambda s: s.relative, default=None)
            summary["straggler/count"] = len(stragglers)
            if worst is not None:
                summary["straggler/rank"] = worst.rank
                summary["straggler/relative"] = worst.relative
                summary["straggler/individual"] = worst.individual
            self.publish(summary)

    def pause(self) -> None:
        """Put torch.distributed's own functions back until resume (benchmarks: the other side)."""
        if self.tracker is not None:
            self.tracker.uninstall()

    def resume(self) -> None:
        """Wrap torch.distributed's functions again."""
        if self.tracker is not None:
            self.tracker.install()

    def close(self) -> None:
        """Stop the watchdog, put torch.distributed back, close observe.jsonl."""
        if self.watchdog is not None:
            self.watchdog.close()
        if self.tracker is not None:
            self.tracker.uninstall()
            for hook in self._hooks:
                hook.remove()
        if self._file is not None:
            self._file.close()

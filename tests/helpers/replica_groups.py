"""Fault-tolerant replica groups as real processes: each group is its own gloo world of ranks
(forked from the spawn helper's preloaded server), all meeting at one torchft lighthouse that
the test process runs. A group can be SIGKILLed and started again, as a crashed torchrun would
be."""

from __future__ import annotations

import json
import os
import pickle
import random
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from launcher.run.ports import free_port, local_rank_env
from tests.helpers.spawn import _CONTEXT


def store_port() -> int:
    """A free port below Linux's ephemeral range (32768+): torchft's manager, HTTP and gloo
    sockets bind ephemeral ports all the time, and one could take an ephemeral free_port()
    before the group's TCPStore binds it."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def _group_rank(
    overrides: list[str], rank: int, world: int, port: int, run_dir: str, env: dict, queue: Any
) -> None:
    os.environ.clear()
    os.environ.update(env, **local_rank_env(rank, world, port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from launcher.run.build import load_data
    from launcher.run.loop import train
    from parallel.parallelize import full_state_dict
    from tests.helpers.run_training import make_config

    torch.set_num_threads(1)
    try:
        cfg = make_config(overrides, world)
        summary = train(cfg, load_data(cfg), Path(run_dir))
        assert summary.trainer is not None
        weights = full_state_dict(summary.trainer.model)
        position = summary.trainer.sampler.samples_consumed  # where its data stands at the end
        queue.put((rank, pickle.dumps((summary.losses, weights, position)), None))
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class ReplicaGroups:
    """Start, kill and collect replica groups of `world` ranks training `overrides`."""

    def __init__(self, overrides: list[str], world: int, lighthouse: str, root: Path) -> None:
        """Every group trains overrides + its fault_tolerance.replica_id, in root/group-<id>."""
        self.overrides, self.world, self.root = overrides, world, root
        self.env = dict(os.environ, TORCHFT_LIGHTHOUSE=lighthouse)
        self.procs: dict[int, list[Any]] = {}
        self.queues: dict[int, Any] = {}

    def run_dir(self, group: int, attempt: int = 0) -> Path:
        """Where a group's attempt writes its metrics.jsonl and checkpoints."""
        return self.root / f"group-{group}-{attempt}"

    def start(self, group: int, attempt: int = 0) -> None:
        """Start the group's ranks on a fresh port (its own TCPStore)."""
        queue, port = _CONTEXT.Queue(), store_port()
        overrides = [*self.overrides, f"fault_tolerance.replica_id={group}"]
        self.run_dir(group, attempt).mkdir(parents=True)
        run_dir = str(self.run_dir(group, attempt))
        self.procs[group] = [
            _CONTEXT.Process(
                target=_group_rank,
                args=(overrides, r, self.world, port, run_dir, self.env, queue),
            )
            for r in range(self.world)
        ]
        self.queues[group] = queue
        for p in self.procs[group]:
            p.start()

    def steps_logged(self, group: int, attempt: int = 0) -> list[dict]:
        """The group's metrics.jsonl records so far."""
        path = self.run_dir(group, attempt) / "metrics.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_for_step(self, group: int, step: int, timeout: float = 120) -> None:
        """Block until the group has logged `step`."""
        deadline = time.monotonic() + timeout
        while not any(r["step"] >= step for r in self.steps_logged(group)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"group {group} did not reach step {step}")
            time.sleep(0.05)

    def kill(self, group: int) -> None:
        """SIGKILL every rank of the group, as a lost node would end it."""
        for p in self.procs[group]:
            p.kill()
        for p in self.procs[group]:
            p.join()

    def results(self, group: int, timeout: float = 180) -> list[tuple[list[float], dict, int]]:
        """Each rank's (losses, full weights, samples consumed), once the group finished."""
        out: dict[int, Any] = {}
        for _ in range(self.world):
            rank, value, error = self.queues[group].get(timeout=timeout)
            if error:
                raise RuntimeError(f"group {group} rank {rank} failed:\n{error}")
            out[rank] = pickle.loads(value)
        for p in self.procs[group]:
            p.join(timeout=30)
        return [out[r] for r in range(self.world)]

    def stop_all(self) -> None:
        """Kill whatever still runs (a failed test must not leave ranks behind)."""
        for procs in self.procs.values():
            for p in procs:
                if p.is_alive():
                    p.kill()

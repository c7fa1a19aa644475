"""Run a function on N real gloo ranks (spawned processes) and collect each rank's return value.

`run_ranks(world, fn, *args)` gives fn a started environment (RANK, WORLD_SIZE, MASTER_PORT);
`run_on_mesh((dp, pp, tp), fn, *args, cp=1)` also starts the process group and hands fn the real
named (dp, pp, cp, tp) DeviceMesh, so TP, CP, DP or clipping can be unit-tested on a bare mesh (nanotron's
`init_distributed(tp=, dp=, pp=)(fn)()` is the model).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import traceback
from collections.abc import Callable
from typing import Any

from launcher.run.ports import free_port, local_rank_env

PORT_TAKEN = ("EADDRINUSE", "address already in use", "Address already in use")
ATTEMPTS = 3  # a free port can be taken by another process before rank 0 binds it
# Ranks fork from one server that imported these once: importing torch, its pipelining/FSDP and
# the launcher costs ~5 s of CPU per process here, paid once per test session instead of once
# per rank per test. The server holds no threads or process groups when it forks.
PRELOAD = ["torch", "torch.distributed.pipelining", "torch.distributed.fsdp", "launcher.run.loop"]
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    port: int,
    args: tuple,
    queue: Any,
    env: dict[str, str],
    cwd: str,
) -> None:
    # a forked rank starts with the server's environment and folder: take the caller's
    os.environ.clear()
    os.environ.update(env, **local_rank_env(rank, world, port), OMP_NUM_THREADS="1")
    os.chdir(cwd)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        # plain pickle: tensors travel in-band, not as shared-memory handles that die with the rank
        queue.put((rank, pickle.dumps(fn(*args)), None))
    except BaseException:  # report, don't hang the parent
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_once(world: int, fn: Callable[..., Any], args: tuple, timeout: float) -> list[Any]:
    queue = _CONTEXT.Queue()
    port = free_port()
    env, cwd = dict(os.environ), os.getcwd()
    procs = [
        _CONTEXT.Process(target=_rank_main, args=(fn, r, world, port, args, queue, env, cwd))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, value, error = queue.get(timeout=timeout)
            if error:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 600) -> list[Any]:
    """fn(*args) on `world` ranks; returns results by rank, raising the first rank's error.

    A rendezvous port taken by another process between choosing and binding it is retried on
    a new port."""
    for attempt in range(ATTEMPTS):
        try:
            return _run_once(world, fn, args, timeout)
        except RuntimeError as err:
            if attempt == ATTEMPTS - 1 or not any(s in str(err) for s in PORT_TAKEN):
                raise
    raise AssertionError("unreachable")


def _on_mesh(shape: tuple[int, int, int], cp: int, fn: Callable[..., Any], args: tuple) -> Any:
    import torch

    from parallel.mesh import build_mesh

    mesh = build_mesh(torch.device("cpu"), *shape, cp=cp)
    return fn(mesh, *args)


def run_on_mesh(
    shape: tuple[int, int, int],
    fn: Callable[..., Any],
    *args: Any,
    cp: int = 1,
    timeout: float = 600,
) -> list[Any]:
    """fn(mesh, *args) on dp*pp*cp*tp ranks, `mesh` the real (dp, pp, cp, tp) gloo DeviceMesh."""
    dp, pp, tp = shape
    return run_ranks(dp * pp * cp * tp, _on_mesh, shape, cp, fn, args, timeout=timeout)


def exit_codes(world: int, fn: Callable[..., Any], *args: Any, timeout: float) -> list[int | None]:
    """fn(*args) on `world` ranks that may end the process themselves (os._exit); each rank's
    exit code once all have ended, None for one still running after `timeout` s (then killed)."""
    queue = _CONTEXT.Queue()
    env, cwd, port = dict(os.environ), os.getcwd(), free_port()
    procs = [
        _CONTEXT.Process(target=_rank_main, args=(fn, r, world, port, args, queue, env, cwd))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes

"""The straggler report on real gloo ranks: a slow data fetch or backward on one rank is named
with its phase within two intervals; a balanced run names nobody."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.run_training import TINY_RUN
from tests.helpers.spawn import run_ranks

TINY = [*TINY_RUN, "observe.interval=5"]
SLEEP_S = 0.2


def _observed(run_dir: str, overrides: list[str], slow_rank: int, where: str) -> list[dict]:
    """Train on this rank with a test-only sleep patched into one rank; rank 0 returns
    observe.jsonl's records."""
    from data import DistributedBatchSampler
    from launcher.run.build import load_data
    from launcher.run.compose import compose_config
    from launcher.run.loop import train

    rank = int(os.environ["RANK"])
    if rank == slow_rank and where == "data":
        fetch = DistributedBatchSampler.next_batch

        def slow_fetch(self: DistributedBatchSampler) -> tuple[torch.Tensor, torch.Tensor]:
            time.sleep(SLEEP_S)
            return fetch(self)

        DistributedBatchSampler.next_batch = slow_fetch  # type: ignore[method-assign]
    if rank == slow_rank and where == "backward":
        backward = torch.autograd.backward

        def slow_backward(*args: object, **kwargs: object) -> None:
            time.sleep(SLEEP_S)
            backward(*args, **kwargs)  # type: ignore[arg-type]

        torch.autograd.backward = slow_backward  # type: ignore[assignment]
    cfg = compose_config([*TINY, *overrides], int(os.environ["WORLD_SIZE"]))
    train(cfg, load_data(cfg), Path(run_dir))
    if rank != 0:
        return []
    lines = (Path(run_dir) / "observe.jsonl").read_text().splitlines()
    metrics = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines] + [json.loads(metrics[-1])]


@pytest.mark.long(7)
@pytest.mark.parametrize("where,phase", [("data", "data"), ("backward", "compute")])
def test_a_slow_rank_is_named_with_its_phase(tmp_path: Path, where: str, phase: str) -> None:
    slow = 2 if where == "data" else 1
    *records, logged = run_ranks(
        4, _observed, str(tmp_path), ["parallel.dp=4", "train.steps=10"], slow, where
    )[0]
    assert [r["step"] for r in records] == [5, 10]
    # the metrics sinks get the summary with the logged step (the last, here)
    assert logged["step"] == 10 and "loss" in logged and logged["straggler/rank"] == slow
    named = {(s["rank"], s["phase"]) for r in records for s in r["stragglers"]}
    assert named == {(slow, phase)}, records
    times = records[0]["phase_s"][phase]
    others = [t for r, t in enumerate(times) if r != slow]
    # the sleep stands out side by side: what it adds, not the (load-dependent) compute around it
    assert times[slow] >= SLEEP_S * 0.9 and times[slow] - max(others) >= SLEEP_S * 0.5, times


@pytest.mark.long(18)
def test_a_balanced_run_names_nobody_and_raises_no_false_alarm(tmp_path: Path) -> None:
    # the watchdog at a 5 s timeout over ~15 s of steps (the 60 s at 20 s, shortened)
    overrides = ["parallel.dp=4", "train.steps=80", "observe.hang_timeout_s=5"]
    *records, logged = run_ranks(4, _observed, str(tmp_path), overrides, -1, "")[0]
    assert len(records) == 16 and logged["straggler/count"] == 0
    assert [r["stragglers"] for r in records] == [[]] * 16, records
    assert not (tmp_path / "hang-report.json").exists()


def _trainer_freed_on_return(run_dir: str) -> bool:
    """Train with the watchdog on and the collector off; whether dropping the summary frees the
    trainer (a cycle would keep it, and its process groups' threads, until interpreter exit)."""
    import gc
    import weakref

    from launcher.run.build import load_data
    from launcher.run.compose import compose_config
    from launcher.run.loop import train

    cfg = compose_config([*TINY, "train.steps=2"], 1)
    gc.disable()
    summary = train(cfg, load_data(cfg), Path(run_dir))
    trainer = weakref.ref(summary.trainer)
    del summary
    freed = trainer() is None
    gc.enable()
    return freed


@pytest.mark.long(4)
def test_a_finished_run_keeps_nothing_alive_through_its_watchdog(tmp_path: Path) -> None:
    assert run_ranks(1, _trainer_freed_on_return, str(tmp_path)) == [True]


def _profiled(run_dir: str, overrides: list[str]) -> None:
    from launcher.run.build import load_data
    from launcher.run.compose import compose_config
    from launcher.run.loop import train

    cfg = compose_config([*TINY, *overrides], 8)
    train(cfg, load_data(cfg), Path(run_dir))


@pytest.mark.long(12)
def test_a_profiled_3d_run_writes_one_loadable_trace_per_chosen_rank(tmp_path: Path) -> None:
    layout = ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2", "parallel.microbatches=2"]
    profile = ["train.steps=3", "profile.steps=[2,3]", "profile.ranks=[0,5]"]
    run_ranks(8, _profiled, str(tmp_path), [*layout, *profile])
    traces = sorted((tmp_path / "profile").iterdir())
    assert [t.name for t in traces] == ["trace-rank0-steps2-3.json", "trace-rank5-steps2-3.json"]
    for trace in traces:
        events = json.loads(trace.read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        assert any("ProfilerStep" in n or "aten::" in n for n in names), sorted(names)[:20]
        assert any(e.get("name") == "[memory]" for e in events)  # profile_memory=True


def test_nccl_runs_turn_on_the_flight_recorder_into_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.config import Config, ObserveConfig
    from launcher.run.observe import prepare_environment
    from parallel.observe.watchdog import flight_recorder_env

    for key in flight_recorder_env(tmp_path):
        monkeypatch.delenv(key, raising=False)
    prepare_environment(Config(device="cpu"), tmp_path)  # gloo: nothing to turn on
    prepare_environment(
        Config(device="cuda", observe=ObserveConfig(flight_recorder=False)), tmp_path
    )
    assert not set(flight_recorder_env(tmp_path)) & set(os.environ)
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "77")  # a variable the user set wins
    prepare_environment(Config(device="cuda"), tmp_path)  # set before init_process_group
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "77"
    for key in ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
        assert os.environ[key] == str(tmp_path / "flight_recorder" / "rank_")
    assert (tmp_path / "flight_recorder").is_dir()


def test_the_watchdog_stops_once_the_loop_that_started_it_has_ended() -> None:
    import sys

    from launcher.run.observe import _running

    def loop() -> object:
        running = _running(sys._getframe())
        assert running()  # inside the loop, and from deeper calls too
        return running

    running = loop()
    assert not running()  # returned (or raised): a later timeout must not end the process

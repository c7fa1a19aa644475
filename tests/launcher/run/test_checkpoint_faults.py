"""Never lose a run: a save that fails is never committed, never costs an older checkpoint, and
stops the run with one line; a checkpoint.dir that cannot work is refused before training.

Through the real entry point: a real short write (RLIMIT_FSIZE in the child) and an unwritable
checkpoint.dir. In spawned gloo ranks (2, dp=2): failures injected on one rank only, sync and
async, which every rank must report alike, and the preflight's refusals and warning.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from launcher.config import ConfigError
from launcher.run.build import build_trainer, load_data
from launcher.run.checkpointing import RunCheckpoints
from parallel.checkpoint.format import read_manifest
from parallel.checkpoint.state import CheckpointError
from tests.helpers.run_training import make_config
from tests.helpers.spawn import run_ranks

REPO = Path(__file__).resolve().parents[3]
BASE = [
    "model=debug",
    "train.seq_len=32",
    "train.global_batch_size=8",
    "train.sample_tokens=0",
    "train.val_interval=1000",
    "device=cpu",
]
# the debug model's shards at seq 64 on one rank: model 1.72 MB, optim 3.46 MB; the manifest
# (33 kB) and metrics.jsonl stay far below the limit
FSIZE_LIMIT = 2_500_000
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _entry_point(
    tmp: Path, overrides: list[str], fsize: int | None = None
) -> subprocess.CompletedProcess:
    def limit() -> None:
        if fsize is not None:  # in the child only: files it writes stop at `fsize` bytes
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    cmd = [
        sys.executable,
        "-m",
        "launcher.train",
        *BASE,
        *overrides,
        f"hydra.run.dir={tmp / 'run'}",
    ]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit
    )


def test_a_short_shard_write_is_never_committed(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    # the first save (step 2) writes the model shard whole and hits the limit in the optimizer's
    result = _entry_point(
        tmp_path,
        [
            "train.steps=4",
            "train.seq_len=64",
            "checkpoint.interval=2",
            "checkpoint.keep=1",
            f"checkpoint.dir={ck}",
        ],
        FSIZE_LIMIT,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]  # no writer thread's traceback
    shard = ck / ".tmp-step-00000002" / "optim" / "shard-00001-model-00001-of-00001.safetensors"
    assert lines[0].startswith("checkpoint error: cannot save checkpoint step 2"), lines[0]
    assert f"{shard}: [Errno 27] File too large" in lines[0] and "nothing was committed" in lines[0]
    assert sorted(p.name for p in ck.iterdir()) == []  # no step-*, no .tmp-*, no latest
    assert "step=3" not in result.stdout  # it stopped at the failed save


def test_an_unwritable_checkpoint_dir_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    ck = tmp_path / "a-file" / "ck"  # root writes anywhere, but not under a regular file
    result = _entry_point(tmp_path, ["train.steps=2", f"checkpoint.dir={ck}"])
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: checkpoint.dir='{ck}': "), lines
    assert "Not a directory" in lines[0] and "rank 0" in lines[0]
    assert "step=1" not in result.stdout and not (tmp_path / "run" / "metrics.jsonl").exists()


# ---- in spawned ranks: failures on one rank, seen by all -------------------------------------

RELEASE = threading.Event()  # set by the test body (in the rank) to let a held write go on


def _fail_writes(rank: int, part: str, step: int, hold: bool = False) -> None:
    """From now on, `rank`'s writes into `part` of a save of `step` raise ENOSPC (after RELEASE
    when hold); a save of another step still in flight is left alone."""
    import parallel.checkpoint.stream as stream

    original = stream._CountingStream.write

    def write(self: Any, data: Any) -> int:
        path = self.record.path
        if dist.get_rank() == rank and path.parts[-3:-1] == (f".tmp-step-{step:08d}", part):
            if hold:
                RELEASE.wait(60)
            raise ENOSPC
        return original(self, data)

    stream._CountingStream.write = write
    _restore.append(lambda: setattr(stream._CountingStream, "write", original))


_restore: list[Any] = []


def _undo() -> None:
    while _restore:
        _restore.pop()()


def _error(fn: Any) -> str:
    try:
        fn()
    except (CheckpointError, ConfigError) as err:
        return str(err)
    return "no error"


def _state(ck: Path) -> dict[str, Any]:
    """What a checkpoint root holds, and whether its newest checkpoint reads whole."""
    entries = sorted(p.name for p in ck.iterdir())
    newest = read_manifest(ck / entries[-1]) if entries and entries[-1].startswith("step-") else {}
    whole = all(
        (ck / entries[-1] / f).stat().st_size == info["bytes"]
        for f, info in newest.get("files", {}).items()
    )
    return {
        "entries": entries,
        "latest": (ck / "latest").read_text().strip() if (ck / "latest").exists() else None,
        "whole": whole and bool(newest),
    }


def _faults(tmp: str) -> dict[str, Any]:
    """On each of 2 ranks: the scenarios below; what each rank saw."""
    import parallel.checkpoint.commit as commit

    seen: dict[str, Any] = {}
    # sync, keep=1: step 1 saved; step 2's optimizer write fails on rank 1 only
    cfg = make_config(
        BASE
        + ["parallel.dp=2", "train.steps=4", "checkpoint.keep=1", f"checkpoint.dir={tmp}/sync"],
        2,
    )
    trainer = build_trainer(cfg, load_data(cfg))
    checkpoints = RunCheckpoints(cfg, None)
    trainer.train_step()
    checkpoints.save(trainer)
    trainer.train_step()
    _fail_writes(1, "optim", step=2)
    seen["sync"] = _error(lambda: checkpoints.save(trainer))
    _undo()
    dist.barrier()  # rank 0 has looked at nothing yet: compare after both ranks are back
    seen["sync_after"] = _state(Path(tmp) / "sync")

    # sync: every shard written, rank 0's manifest write finds the disk full
    original = commit._write_text

    def full_disk(path: Path, text: str) -> None:
        if path.name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original(path, text)

    commit._write_text = full_disk
    seen["manifest"] = _error(lambda: checkpoints.save(trainer))
    commit._write_text = original
    dist.barrier()  # as above
    seen["manifest_after"] = _state(Path(tmp) / "sync")

    # async: step 2's save held on rank 1, then failing; reported by raise_if_failed, no later save
    cfg = make_config(
        BASE
        + [
            "parallel.dp=2",
            "train.steps=4",
            "checkpoint.keep=1",
            "checkpoint.async_save=true",
            f"checkpoint.dir={tmp}/async",
        ],
        2,
    )
    checkpoints = RunCheckpoints(cfg, None)
    trainer.step = 1
    checkpoints.save(trainer)
    trainer.step = 2
    _fail_writes(1, "optim", step=2, hold=True)
    checkpoints.save(trainer)  # waits for step 1's save, then starts step 2's
    start = time.perf_counter()
    checkpoints.raise_if_failed()  # in flight: returns at once
    seen["check_s"] = time.perf_counter() - start
    trainer.train_step()  # the next step runs while the save is held
    RELEASE.set()
    polls, deadline = 0, time.monotonic() + 60
    seen["async"] = "no error"
    while time.monotonic() < deadline:
        polls += 1
        if (message := _error(checkpoints.raise_if_failed)) != "no error":
            seen["async"] = message
            break
        time.sleep(0.05)
    seen["async_again"] = _error(checkpoints.raise_if_failed)  # reported once
    trainer.step = 2
    checkpoints.save(trainer)  # step 2 again, failing again on rank 1: close() must raise it
    seen["async_close"] = _error(checkpoints.close)
    _undo()
    dist.barrier()  # both ranks' saves are over before either looks
    seen["async_after"] = _state(Path(tmp) / "async")

    # preflight: a root under a regular file; too little space; room for fewer than keep + 1
    if dist.get_rank() == 0:
        (Path(tmp) / "a-file").write_text("x")
    dist.barrier()  # the file exists before any rank probes under it
    seen["writable"] = _error(lambda: RunCheckpoints(cfg, None).preflight(trainer))
    cfg.checkpoint.dir = f"{tmp}/a-file/ck"
    seen["unwritable"] = _error(lambda: RunCheckpoints(cfg, None).preflight(trainer))
    import shutil

    disk_usage = shutil.disk_usage
    cfg.checkpoint.dir, cfg.checkpoint.interval, cfg.train.steps = f"{tmp}/space", 1, 100
    # one checkpoint of the debug model: 1.72 MB of weights + twice that of AdamW moments
    for name, free in (("tiny", 1000), ("roomy_for_one", 7_000_000)):
        shutil.disk_usage = lambda path, free=free: disk_usage(path)._replace(free=free)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            seen[name] = _error(lambda: RunCheckpoints(cfg, None).preflight(trainer))
        seen[f"{name}_out"] = out.getvalue()
    shutil.disk_usage = disk_usage
    cfg.checkpoint.dir = None
    seen["no_root"] = _error(lambda: RunCheckpoints(cfg, None).preflight(trainer))
    return seen


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(2, _faults, str(tmp_path_factory.mktemp("faults")))


def test_a_write_failing_on_one_rank_fails_the_save_on_every_rank(faults: list[dict]) -> None:
    r0, r1 = faults
    assert r0["sync"] == r1["sync"], (r0["sync"], r1["sync"])  # the same error on every rank
    assert "cannot save checkpoint step 2" in r0["sync"] and "rank 1 could not write" in r0["sync"]
    assert ".tmp-step-00000002/optim/" in r0["sync"] and "No space left on device" in r0["sync"]
    # keep=1 deleted nothing: step 1 is whole, `latest` still names it, no .tmp- left
    assert r0["sync_after"] == {
        "entries": ["latest", "step-00000001"],
        "latest": "step-00000001",
        "whole": True,
    }


def test_a_manifest_that_cannot_be_written_is_a_failed_save_on_every_rank(
    faults: list[dict],
) -> None:
    r0, r1 = faults
    assert r0["manifest"] == r1["manifest"] and "manifest.json" in r0["manifest"]
    assert "No space left on device" in r0["manifest"] and "nothing was committed" in r0["manifest"]
    assert r0["manifest_after"] == r0["sync_after"]


def test_a_failed_async_save_is_reported_at_the_next_step_on_every_rank(
    faults: list[dict],
) -> None:
    for seen in faults:
        assert seen["check_s"] < 0.5  # a Future check, not a wait
        assert "rank 1 could not write" in seen["async"] and "step 2" in seen["async"], seen
        assert seen["async_again"] == "no error"  # reported once
        assert "rank 1 could not write" in seen["async_close"] and "step 2" in seen["async_close"]
        assert seen["async_after"] == {
            "entries": ["latest", "step-00000001"],
            "latest": "step-00000001",
            "whole": True,
        }


def test_preflight_refuses_an_unwritable_or_full_checkpoint_dir(faults: list[dict]) -> None:
    r0, r1 = faults
    assert r0["writable"] == r0["no_root"] == "no error"
    assert r0["unwritable"] == r1["unwritable"]  # gathered: every rank raises the same
    assert (
        r0["unwritable"].startswith("config error: checkpoint.dir=")
        and "a-file/ck" in r0["unwritable"]
    )
    assert "ranks 0, 1: cannot write" in r0["unwritable"] and "Not a directory" in r0["unwritable"]
    assert "0.0 MiB free there, one checkpoint of this run takes about" in r0["tiny"]
    # room for one (about 5.2 MB for the debug model) but not for keep=1 + the one being written
    assert r0["roomy_for_one"] == r1["roomy_for_one"] == "no error"
    assert r0["roomy_for_one_out"].startswith("warning: checkpoint.dir=")
    assert "holds 1 checkpoints" in r0["roomy_for_one_out"] and r1["roomy_for_one_out"] == ""

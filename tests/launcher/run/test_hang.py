"""The hang watchdog on real gloo ranks: a rank that skips an all-reduce, or stops sending in a
pipeline, makes every rank exit with HANG_EXIT_CODE within the timeout + 10 s, and the report
names it with the group and sequence number; a healthy run raises no false alarm."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from parallel.observe.watchdog import HANG_EXIT_CODE, REPORT_NAME
from tests.helpers.run_training import TINY_RUN
from tests.helpers.spawn import exit_codes

TINY = TINY_RUN
TIMEOUT_S = 5


def _faulty(run_dir: str, overrides: list[str], bad_rank: int, fault: str) -> None:
    """Train with a test-only fault patched into one rank: skip one all_reduce, or block
    forever in one pipeline send."""
    import torch.distributed as dist
    import torch.distributed.pipelining.schedules as schedules

    from launcher.run.build import load_data
    from launcher.run.compose import compose_config
    from launcher.run.loop import train

    if int(os.environ["RANK"]) == bad_rank:
        module, name = (dist, "all_reduce") if fault == "skip" else (schedules, "_batch_p2p")
        inner, calls = getattr(module, name), [0]

        def faulty(*args: Any, **kwargs: Any) -> Any:
            sends = fault == "skip" or any(op.op is dist.isend for op in args[0])
            calls[0] += sends
            if sends and calls[0] == 12:  # a few steps in
                (Path(run_dir) / "fault_at").write_text(str(time.time()))
                if fault == "skip":
                    return None  # this rank skips one all-reduce
                time.sleep(3600)  # this rank stops sending
            return inner(*args, **kwargs)

        setattr(module, name, faulty)
    cfg = compose_config([*TINY, *overrides], int(os.environ["WORLD_SIZE"]))
    try:
        train(cfg, load_data(cfg), Path(run_dir))
    except Exception:  # as under `python -m launcher.train`: an uncaught error exits 1
        os._exit(1)


def _report(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / REPORT_NAME).read_text())


@pytest.mark.long(12)
@pytest.mark.parametrize(
    "layout,bad,fault",
    [
        (["parallel.dp=4"], 3, "skip"),
        (["parallel.dp=2", "parallel.pp=2", "parallel.microbatches=2"], 1, "stop"),
    ],
)
def test_a_hang_names_the_rank_and_every_rank_exits(
    tmp_path: Path, layout: list[str], bad: int, fault: str
) -> None:
    overrides = [*layout, "train.steps=40", f"observe.hang_timeout_s={TIMEOUT_S}"]
    codes = exit_codes(4, _faulty, str(tmp_path), overrides, bad, fault, timeout=120)
    assert codes == [HANG_EXIT_CODE] * 4, codes
    report = _report(tmp_path)
    assert report["suspect_ranks"] == [bad], report["groups"]
    group = next(g for g in report["groups"] if bad in g["behind"] + g["ahead"])
    assert group["group"] and group["waiting_at_seq"] > 0 and bad in group["ranks"]
    assert set(report["ranks"]) == {"0", "1", "2", "3"}
    assert "File" in report["ranks"][str(bad)]["stacks"]
    exited = time.time() - float((tmp_path / "fault_at").read_text())
    assert exited < TIMEOUT_S + 10, exited

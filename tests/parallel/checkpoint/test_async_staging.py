"""Async saves copy the tensors in the background: an optimizer step right after save() waits
for the copy, so the checkpoint holds the weights and moments of the step it was taken at.
One spawned rank with a tiny module; the copy is slowed down so the step surely arrives first."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.llama import ModelArgs
from tests.helpers.spawn import run_ranks

COPY_DELAY_S = 0.5


def _save_then_step(root: str) -> dict[str, Any]:
    import torch.distributed as dist

    import parallel.checkpoint.async_save as async_save
    from parallel.checkpoint.load import load_checkpoint
    from parallel.checkpoint.save import CheckpointMeta

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model, fresh = nn.Linear(8, 8), nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    stage = async_save._Buffers.stage

    def slow_stage(self: Any, part: Any) -> Any:
        time.sleep(COPY_DELAY_S)  # the step below arrives while the copy has not begun
        return stage(self, part)

    async_save._Buffers.stage = slow_stage  # type: ignore[method-assign]
    checkpointer = async_save.AsyncCheckpointer()
    meta = CheckpointMeta(model=ModelArgs(), layout={})
    in_save = checkpointer.save(Path(root), 1, [model], opt, {}, meta)
    start = time.perf_counter()
    opt.step()  # must wait for the copy, then change the weights
    waited = time.perf_counter() - start
    path = checkpointer.wait()
    checkpointer.close()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    load_checkpoint(Path(str(path)), [fresh], fresh_opt, {}, layout={})
    same = all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())
    changed = not torch.equal(model.weight, expected["weight"])
    dist.destroy_process_group()
    return {"in_save": in_save, "waited": waited, "same": same, "changed": changed}


def test_an_optimizer_step_after_an_async_save_waits_for_the_copy(tmp_path: Path) -> None:
    (seen,) = run_ranks(1, _save_then_step, str(tmp_path))
    assert seen["in_save"] < COPY_DELAY_S  # save() itself does not copy
    assert seen["waited"] >= COPY_DELAY_S * 0.8  # the step waited for the copy
    assert seen["same"] and seen["changed"]  # saved: the weights before that step

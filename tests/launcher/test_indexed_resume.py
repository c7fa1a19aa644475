"""A preprocessed jsonl.zst + parquet blend trains at dp=2 x pp=2 x tp=2 and resumes at dp=4 on
exactly the same global samples, step by step."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from data.preprocess import preprocess
from launcher.run.build import load_data
from tests.helpers.run_training import make_config
from tests.helpers.spawn import run_ranks

STEPS, GBS, SEQ, SAVE_AT = 4, 8, 32, 2
BASE = [
    "model=debug",
    "data=indexed",
    f"train.steps={STEPS}",
    f"train.seq_len={SEQ}",
    f"train.global_batch_size={GBS}",
    "train.sample_tokens=0",
    "train.seed=7",
    "data.val_fraction=0.1",
    "optim.warmup_steps=1",
    "optim.eps=1e-5",  # as the parity tests: layouts agree to 1e-5 in fp32
    "device=cpu",
    "checkpoint.final=false",
]


def _train_recording(overrides: list[str], world: int) -> tuple[int, list[torch.Tensor], list]:
    """Rank side: train, recording the inputs every next_batch call returned on this rank."""
    from data.batch_sampler import DistributedBatchSampler
    from launcher.run.loop import train

    seen: list[torch.Tensor] = []
    inner = DistributedBatchSampler.next_batch

    def recording(self: DistributedBatchSampler) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = inner(self)
        seen.append(inputs.clone())
        return inputs, targets

    DistributedBatchSampler.next_batch = recording  # type: ignore[method-assign]
    cfg = make_config(overrides, world)
    summary = train(cfg, load_data(cfg))
    assert summary.trainer is not None
    return summary.trainer.model.mesh["dp"].get_local_rank(), seen, summary.losses


def _global_batches(results: list[tuple[int, list[torch.Tensor], list]]) -> list[torch.Tensor]:
    """Each step's global batch: the dp ranks' rows in dp order; every rank of a dp group
    (its tp and pp ranks) must have read the same rows."""
    by_dp: dict[int, list[torch.Tensor]] = {}
    for dp_rank, seen, _ in results:
        if dp_rank in by_dp:
            assert all(torch.equal(a, b) for a, b in zip(by_dp[dp_rank], seen, strict=True))
        by_dp[dp_rank] = seen
    return [torch.cat(rows) for rows in zip(*(by_dp[r] for r in sorted(by_dp)))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root = tmp_path_factory.mktemp("indexed")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    docs = [" ".join(words[(i * j) % 10] for j in range(5 + i % 40)) for i in range(240)]
    raw = "".join(json.dumps({"text": d}) + "\n" for d in docs[:120]).encode()
    (root / "web.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"content": docs[120:]}), root / "books.parquet")
    preprocess(str(root / "web.jsonl.zst"), str(root / "web"))
    preprocess(str(root / "books.parquet"), str(root / "books"), text_key="content")
    blend = [f"data.paths=[0.3,{root / 'web'},0.7,{root / 'books'}]"]
    ckpt = root / "ckpt"
    three_d = ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2", "parallel.microbatches=2"]
    first = run_ranks(
        8,
        _train_recording,
        BASE + blend + three_d + [f"checkpoint.dir={ckpt}", f"checkpoint.interval={SAVE_AT}"],
        8,
    )
    step_dir = next(ckpt.glob(f"*{SAVE_AT:08d}*"))
    resumed = run_ranks(
        4, _train_recording, BASE + blend + ["parallel.dp=4", f"train.resume={step_dir}"], 4
    )
    cfg = make_config(BASE + blend, 1)
    train = load_data(cfg).train
    expected = [
        train.rows(range(s * GBS, (s + 1) * GBS), cfg.train.seed)[:, :-1] for s in range(STEPS)
    ]
    sources = train.source_samples(range(STEPS * GBS))  # type: ignore[union-attr]
    return {"first": first, "resumed": resumed, "expected": expected, "sources": sources}


@pytest.mark.long(30)  # one 8-rank and one 4-rank training (12 s measured, load 6)
def test_resume_at_dp4_reads_the_same_samples_step_by_step(runs: dict[str, Any]) -> None:
    first, resumed = _global_batches(runs["first"]), _global_batches(runs["resumed"])
    assert len(first) == STEPS and len(resumed) == STEPS - SAVE_AT
    for step in range(STEPS):
        assert torch.equal(first[step], runs["expected"][step]), f"step {step + 1} at dp=2"
    for step in range(SAVE_AT, STEPS):
        assert torch.equal(resumed[step - SAVE_AT], runs["expected"][step]), f"resumed {step + 1}"
    assert {k for k, _ in runs["sources"]} == {0, 1}  # both sources are in the blend


def test_resumed_losses_match_the_uninterrupted_run(runs: dict[str, Any]) -> None:
    losses, resumed = runs["first"][0][2], runs["resumed"][0][2]
    assert len(losses) == STEPS and len(resumed) == STEPS - SAVE_AT
    assert resumed == pytest.approx(losses[SAVE_AT:], abs=1e-5)

"""Metrics of a real training run: the fields of metrics.jsonl, MFU from the real parameter
count, the console lines, and wandb's offline run files holding the values and the config."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from launcher.config import Config
from launcher.run.build import load_data
from launcher.run.loop import train
from launcher.run.metrics import MetricsLogger
from models.llama import ModelArgs, Transformer
from tests.helpers.run_training import make_config

PEAK_TFLOPS = 0.5
STEPS = 4
FIELDS = {
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tokens_per_s_per_device",
    "step_time_s",
    "data_wait_s",
    "flops_per_token",
    "mfu",
    "peak_memory_gib",
}


def _wandb_records(run_file: Path) -> list[Any]:
    """The protobuf records of a .wandb file (LevelDB log format: 7-byte file header, then
    records of checksum, length, type and data, in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf, out = run_file.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B", data[:8]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
        elif kind == 0:
            break
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path, list[float], str]:
    tmp = tmp_path_factory.mktemp("metrics")
    cfg = make_config(
        [
            "model=debug",
            f"train.steps={STEPS}",
            "train.log_interval=2",
            "train.seq_len=32",
            "train.global_batch_size=8",
            "train.sample_tokens=0",
            "optim.warmup_steps=1",
            "device=cpu",
            f"hardware.peak_tflops={PEAK_TFLOPS}",
            "logging.wandb.enabled=true",
            "logging.wandb.project=tridist-test",
            f"checkpoint.dir={tmp / 'ckpt'}",
        ]
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_API_KEY", raising=False)  # offline, whatever the machine has
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            summary = train(cfg, load_data(cfg), tmp)
    return cfg, tmp, summary.losses, out.getvalue()


def test_metrics_file_has_every_field_and_mfu_from_the_real_model(run) -> None:
    cfg, run_dir, losses, _ = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    args = ModelArgs(**{f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelArgs)})
    model = Transformer(args)
    n = sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel()
    expected_flops = 6 * n + 12 * args.n_layers * args.n_heads * args.head_dim * cfg.train.seq_len
    for r in records:
        assert FIELDS <= r.keys(), FIELDS - r.keys()
        assert r["loss"] == pytest.approx(losses[r["step"] - 1], rel=1e-6)
        assert r["flops_per_token"] == expected_flops
        assert r["mfu"] == pytest.approx(
            expected_flops * r["tokens_per_s_per_device"] / (PEAK_TFLOPS * 1e12)
        )
        assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_time_s"])
        assert r["tokens_per_s_per_device"] == r["tokens_per_s"]  # one device
        assert 0 <= r["data_wait_s"] < r["step_time_s"]
        assert 0.01 < r["peak_memory_gib"] < 64  # this process's resident set
        assert r["lr"] > 0 and r["grad_norm"] > 0
    assert "val_loss" in records[-1]


def test_console_shows_compact_lines_with_eta(run) -> None:
    _, _, _, out = run
    lines = [line for line in out.splitlines() if line.startswith("step=")]
    assert len(lines) == 2, out
    assert (
        lines[1].startswith("step=4 loss=")
        and "mfu=" in lines[1]
        and lines[1].endswith(" 4/4 eta 0:00")
    ), lines


def test_wandb_offline_run_holds_the_values_and_the_config(run) -> None:
    cfg, run_dir, _, _ = run
    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, list((run_dir / "wandb").rglob("*"))
    records = _wandb_records(run_files[0])
    history = [
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["_step"] for h in history] == [r["step"] for r in logged]
    for h, r in zip(history, logged):
        for key in ("loss", "mfu", "tokens_per_s", "peak_memory_gib"):
            assert h[key] == pytest.approx(r[key]), key
    config = {
        i.key: json.loads(i.value_json)
        for r in records
        if r.WhichOneof("record_type") == "run"
        for i in r.run.config.update
        if i.key != "_wandb"
    }
    assert config == json.loads(json.dumps(dataclasses.asdict(cfg)))  # the whole resolved config
    assert (
        config["hardware"]["peak_tflops"] == PEAK_TFLOPS and config["model"]["dim"] == cfg.model.dim
    )


def test_tensorboard_sink_writes_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    printed: list[str] = []
    logger = MetricsLogger(tmp_path, True, tensorboard=True, console=printed.append)
    logger.log({"step": 1, "loss": 3.5, "tokens_per_s": 100.0})
    logger.log({"step": 2, "loss": 3.0, "tokens_per_s": 120.0})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("loss")] == [(1, 3.5), (2, 3.0)]
    assert printed == ["step=1 loss=3.5000 tok/s=100", "step=2 loss=3.0000 tok/s=120"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2

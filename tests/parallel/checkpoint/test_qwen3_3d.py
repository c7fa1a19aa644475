"""Qwen3 dense in a 3D layout, checked against one process and against transformers itself.

One spawn of 8 gloo ranks at dp=2 x pp=2 x tp=2: train `model=qwen3_debug` 2 steps and save,
resume it for a third, and start from a Hugging Face Qwen3 model. Then, in this process: the
losses equal a single-process run's, its export loads in `Qwen3ForCausalLM` with that run's
logits, and the 3D start from HF weights gives transformers' loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.config import ConfigError
from launcher.run.build import build_trainer, load_data, model_args
from launcher.run.loop import train
from models.hf import HFWeights
from models.registry import model_spec
from parallel.checkpoint.hf_export import export_to_hf
from parallel.dtensor import full_value
from tests.helpers.run_training import make_config
from tests.helpers.spawn import run_ranks

transformers = pytest.importorskip("transformers")  # a test dependency: in the [dev] extra

BASE = [
    "model=qwen3_debug",
    "train.seq_len=16",
    "train.global_batch_size=8",
    "train.sample_tokens=0",
    "train.val_interval=1000",
    "optim.warmup_steps=1",
    "optim.eps=1e-5",  # see tests/parallel/test_parity.py: rounding-noise gradients stay still
    "device=cpu",
]
LAYOUT = ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2", "parallel.microbatches=4"]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (8, 17), generator=g)  # 2 rows for each of 4 microbatches
    return tokens[:, :-1], tokens[:, 1:]


def _on_eight_ranks(ckpt: str, hf_dir: str) -> dict[str, object]:
    """Train 2 steps and save, resume for a third, then start from hf_dir: all at 2 x 2 x 2."""
    saving = [f"checkpoint.dir={ckpt}", "checkpoint.interval=1"]
    cfg = make_config(BASE + LAYOUT + saving + ["train.steps=2"], 8)
    out: dict[str, object] = {"losses": train(cfg, load_data(cfg)).losses}
    cfg = make_config(BASE + LAYOUT + saving + ["train.steps=3", "train.resume=auto"], 8)
    out["resumed"] = train(cfg, load_data(cfg)).losses
    cfg = make_config(BASE + LAYOUT + [f"model.init_from={hf_dir}"], 8)
    weights = HFWeights(Path(hf_dir), cfg.model, model_spec("qwen3").hf)
    from_hf = build_trainer(cfg, load_data(cfg), weights)
    out["from_hf_loss"] = from_hf.global_mean(from_hf.evaluate([_batch()])).item()
    return out


def _hf_model(path: Path) -> torch.nn.Module:
    """A random transformers Qwen3 shaped like qwen3_debug, saved to `path`."""
    args = model_args(make_config(BASE))
    config = transformers.Qwen3Config(**model_spec("qwen3").hf.config(args, torch.float32))
    torch.manual_seed(3)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # norms away from one, so a wrong QK-norm mapping shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("qwen3")
    hf_in = _hf_model(tmp / "hf_in")
    ranks = run_ranks(8, _on_eight_ranks, str(tmp / "ckpt"), str(tmp / "hf_in"))
    cfg = make_config(BASE + ["train.steps=3", "checkpoint.final=false"])
    reference = train(cfg, load_data(cfg))
    assert reference.trainer is not None
    logits = full_value(reference.trainer.model.chunks[0](_batch()[0])).detach()
    export_to_hf(tmp / "ckpt" / "step-00000003", tmp / "hf_out")
    return {
        "tmp": tmp,
        "hf_in": hf_in,
        "ranks": ranks,
        "losses": reference.losses,
        "logits": logits,
    }


@pytest.mark.long(20)
def test_trains_saves_and_resumes_equal_to_one_process(qwen3: dict) -> None:
    for rank in qwen3["ranks"]:
        losses = rank["losses"] + rank["resumed"]
        assert len(losses) == 3, losses
        rel = max(abs(a - b) / b for a, b in zip(losses, qwen3["losses"]))
        assert rel <= 1e-5, (losses, qwen3["losses"])


@pytest.mark.long(5)
def test_export_loads_in_transformers_with_the_same_logits(qwen3: dict) -> None:
    out = qwen3["tmp"] / "hf_out"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 32
    model = transformers.Qwen3ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        hf_logits = model(_batch()[0]).logits
    assert ((hf_logits - qwen3["logits"]).abs().max() / hf_logits.abs().max()).item() < 1e-5


@pytest.mark.long(5)
def test_starts_from_hf_weights_in_3d(qwen3: dict) -> None:
    inputs, targets = _batch()
    with torch.no_grad():
        hf = qwen3["hf_in"](inputs).logits
    hf_loss = torch.nn.functional.cross_entropy(hf.flatten(0, 1), targets.flatten()).item()
    for rank in qwen3["ranks"]:
        assert abs(rank["from_hf_loss"] - hf_loss) / hf_loss < 1e-5


def test_a_qwen3_folder_loaded_as_llama_is_refused_before_start(qwen3: dict) -> None:
    hf_in = qwen3["tmp"] / "hf_in"
    with pytest.raises(ConfigError, match=r"model.init_from=.*'qwen3' model, not 'llama'"):
        make_config(["model=debug", f"model.init_from={hf_in}"])

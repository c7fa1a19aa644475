"""Format-1 checkpoints still load: a stored one, saved by tridist before format 2 existed.

data/v1/step-00000002/ was written by commit c8a4d3c (the last one with format
"tridist-checkpoint-1") running
    python -m launcher.train model=debug model.dim=16 model.n_layers=2 model.n_heads=2
        model.n_kv_heads=1 model.multiple_of=16 train.steps=3 train.global_batch_size=2
        train.seq_len=16 train.sample_tokens=0 train.log_interval=1 data.source=text
        data.path=data/v1/corpus.txt device=cpu checkpoint.interval=2 checkpoint.keep=2 ...
and kept at step 2 of the 3; that run logged STEP_3_LOSS for its last step. Loading it with
today's code must give the same weights, the same data position and the same next step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from launcher.run.build import build_trainer, load_data
from launcher.run.checkpointing import checkpoint_layout, trainer_states
from models.llama import ModelArgs, Transformer
from models.llama.hf import LLAMA_HF
from parallel.checkpoint.format import FORMAT_V1, model_args_of, read_manifest
from parallel.checkpoint.hf_export import export_to_hf
from parallel.checkpoint.load import load_checkpoint
from parallel.checkpoint.state import model_state, optimizer_state
from parallel.dtensor import local_part
from tests.helpers.run_training import make_config
from tests.helpers.spawn import run_ranks

DATA = Path(__file__).resolve().parent / "data" / "v1"
V1 = DATA / "step-00000002"
CORPUS = DATA / "corpus.txt"
STEP_3_LOSS = 6.399846076965332  # metrics.jsonl of the run that saved V1


def _hydra(value: Any) -> str:
    return "null" if value is None else json.dumps(value)  # true/false, numbers, "strings"


def _overrides(manifest: dict[str, Any]) -> list[str]:
    """The saving run's settings, from its manifest, with the data file where it is stored now."""
    cfg = manifest["config"]
    return [
        "model=debug",
        "device=cpu",
        "precision=fp32",
        "data.source=text",
        f"data.path={CORPUS}",
        "train.sample_tokens=0",
        *(f"model.{k}={_hydra(v)}" for k, v in manifest["model"].items()),
        *(f"optim.{k}={_hydra(v)}" for k, v in cfg["optim"].items()),
        *(
            f"train.{k}={_hydra(cfg['train'][k])}"
            for k in ("steps", "global_batch_size", "seq_len", "seed")
        ),
    ]


def _load_and_step(path: str) -> dict[str, Any]:
    """On one rank: load the v1 checkpoint into today's trainer, compare, take one step."""
    cfg = make_config(_overrides(read_manifest(Path(path))), 1)
    trainer = build_trainer(cfg, load_data(cfg))
    manifest = load_checkpoint(
        Path(path),
        trainer.model,
        trainer.optimizer,
        trainer_states(trainer),
        checkpoint_layout(cfg),
    )
    trainer.step = manifest["step"]
    on_disk = {
        part: load_file(next((Path(path) / part).glob("*.safetensors")))
        for part in ("model", "optim")
    }
    loaded = {
        "model": model_state(trainer.model).tensors,
        "optim": optimizer_state(trainer.model, trainer.optimizer).tensors,
    }
    return {
        "step": trainer.step,
        "samples_consumed": trainer.sampler.samples_consumed,
        "lr_epoch": trainer.lr_scheduler.last_epoch,
        "names_match": {p: sorted(loaded[p]) == sorted(on_disk[p]) for p in on_disk},
        "unequal": sorted(
            f"{p}/{n}"
            for p in on_disk
            for n, t in on_disk[p].items()
            if not torch.equal(local_part(loaded[p][n]).detach(), t)
        ),
        "next_loss": trainer.global_mean(trainer.train_step().loss).item(),
        "step_after": trainer.step,
    }


@pytest.fixture(scope="module")
def resumed() -> dict[str, Any]:
    return run_ranks(1, _load_and_step, str(V1))[0]


def test_v1_manifest_reads_in_the_current_shape() -> None:
    raw = json.loads((V1 / "manifest.json").read_text())
    assert raw["format"] == FORMAT_V1 and "model" not in raw and "states" not in raw
    manifest = read_manifest(V1)
    assert manifest["states"] == {"sampler": raw["sampler"], "lr_scheduler": raw["lr_scheduler"]}
    args = model_args_of(manifest)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (16, 2, 2, 1)
    # build settings dropped; fields added since (family, head_size, ffn_dim, the MoE's) take
    # their defaults
    moe = {f for f in ModelArgs.__dataclass_fields__ if "expert" in f or f.startswith("moe_")}
    later = {"family", "head_size", "ffn_dim", "norm_topk_prob"} | moe
    assert set(manifest["model"]) == set(ModelArgs.__dataclass_fields__) - later
    assert (args.family, args.head_size, args.ffn_dim, args.n_experts) == ("llama", None, None, 0)


def test_v1_checkpoint_loads_the_saved_weights_and_state(resumed: dict[str, Any]) -> None:
    assert resumed["names_match"] == {"model": True, "optim": True}
    assert resumed["unequal"] == []  # every model and optimizer tensor, bitwise
    assert resumed["step"] == 2 and resumed["samples_consumed"] == 4 and resumed["lr_epoch"] == 2


def test_training_resumes_from_v1_at_step_2(resumed: dict[str, Any]) -> None:
    assert resumed["step_after"] == 3
    assert abs(resumed["next_loss"] - STEP_3_LOSS) / STEP_3_LOSS < 1e-5


def test_v1_checkpoint_exports_to_hugging_face(tmp_path: Path) -> None:
    files = export_to_hf(V1, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (
        16,
        2,
        1,
    )
    saved = load_file(next((V1 / "model").glob("*.safetensors")))
    exported = load_file(files[0])
    assert sorted(exported) == sorted(LLAMA_HF.hf_name(n) for n in saved)
    assert torch.equal(exported["model.embed_tokens.weight"], saved["tok_embeddings.weight"])
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours = Transformer(model_args_of(read_manifest(V1))).eval()
    ours.load_state_dict(saved)
    tokens = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)

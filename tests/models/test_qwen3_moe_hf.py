"""Qwen3-MoE against transformers' `Qwen3MoeForCausalLM`, both ways through the Hugging Face
layout (the router as `mlp.gate`, stacked experts as one tensor per expert), and the folders and
models the layout refuses, through the real entry points."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from launcher import convert
from launcher.run.build import load_data
from launcher.run.loop import train
from models.args import ModelArgs
from models.hf import HFFormatError, HFWeights
from models.registry import model_spec
from parallel.checkpoint.hf_export import export_to_hf
from parallel.dtensor import full_value
from tests.helpers.run_training import make_config

transformers = pytest.importorskip("transformers")  # in the [dev] extra

# head width decoupled from dim / n_heads, GQA, 4 experts of width 16, top 2 renormalized
ARGS = ModelArgs(
    family="qwen3_moe",
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_size=24,
    vocab_size=64,
    norm_eps=1e-6,
    rope_theta=1e6,
    max_seq_len=64,
    n_experts=4,
    experts_per_token=2,
    moe_ffn_dim=16,
)
SPEC = model_spec("qwen3_moe")
TRAIN = [
    "model=qwen3_moe_debug",
    "train.seq_len=16",
    "train.global_batch_size=2",
    "train.steps=1",
    "train.sample_tokens=0",
    "train.val_interval=1000",
    "device=cpu",
]


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


def _close(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _hf_model(path: Path, **save: bool) -> torch.nn.Module:
    """A transformers-initialized Qwen3-MoE shaped like ARGS, saved to `path`."""
    config = transformers.Qwen3MoeConfig(**SPEC.hf.config(ARGS, torch.float32))
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():  # norms off one (a wrong QK-norm permutation shows), decisive routing
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path, **save)
    return model


@pytest.mark.parametrize("original_format", [True, False], ids=["per-expert", "fused"])
def test_import_of_save_pretrained_gives_transformers_logits(
    tmp_path: Path, original_format: bool
) -> None:
    hf = _hf_model(tmp_path, save_original_format=original_format)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # the form we meant to read
        stacked = "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
        assert stacked != original_format, sorted(f.keys())
    weights = HFWeights(tmp_path, ARGS, SPEC.hf)
    ours = SPEC.build(ARGS).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(weights(name, p.shape))
        expected, got = hf(_tokens(ARGS.vocab_size)).logits, ours(_tokens(ARGS.vocab_size))
    assert _close(got, expected) < 1e-5


def _trained_checkpoint(tmp: Path, *overrides: str) -> tuple[Path, torch.Tensor]:
    """One step of qwen3_moe_debug from its initial values, saved; and its final logits."""
    cfg = make_config([*TRAIN, f"checkpoint.dir={tmp}", *overrides])
    trainer = train(cfg, load_data(cfg)).trainer
    assert trainer is not None
    with torch.no_grad():
        logits = full_value(trainer.model.chunks[0](_tokens(cfg.model.vocab_size))).detach()
    return tmp / "step-00000001", logits


def test_export_loads_in_transformers_with_the_same_logits(tmp_path: Path) -> None:
    checkpoint, logits = _trained_checkpoint(tmp_path / "ckpt")
    export_to_hf(checkpoint, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["num_experts"] == 8
    model, info = transformers.Qwen3MoeForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    assert model.config.num_experts_per_tok == 2 and model.config.norm_topk_prob
    with torch.no_grad():
        hf_logits = model.eval()(_tokens(model.config.vocab_size)).logits
    assert _close(logits, hf_logits) < 1e-5
    # and back: the export imported into tridist names every expert of every block
    weights = HFWeights(tmp_path / "hf", make_config(TRAIN).model, SPEC.hf)
    assert weights("layers.3.feed_forward.experts.w2", torch.Size([8, 64, 32])).shape[0] == 8


def test_export_of_a_shared_expert_is_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, _ = _trained_checkpoint(tmp_path / "ckpt", "model.shared_expert_ffn_dim=32")
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["to-hf", str(checkpoint), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    assert "model.shared_expert_ffn_dim=32" in err and "no shared expert" in err, err
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_mismatched_expert_shape_is_refused_with_the_field(tmp_path: Path) -> None:
    _hf_model(tmp_path)
    with pytest.raises(HFFormatError, match=r"num_experts=4 \(model needs 8\)"):
        HFWeights(tmp_path, ModelArgs(**{**vars(ARGS), "n_experts": 8}), SPEC.hf)


def _dense_qwen3(path: Path) -> None:
    """A small transformers Qwen3 (dense), saved to `path`."""
    dense = ModelArgs(**{**vars(ARGS), "family": "qwen3", "n_experts": 0, "ffn_dim": 48})
    config = transformers.Qwen3Config(**model_spec("qwen3").hf.config(dense, torch.float32))
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)


@pytest.mark.parametrize(
    ("flavor", "folder", "expected"),
    [
        ("qwen3_debug", "moe", "a Hugging Face 'qwen3_moe' model, not 'qwen3'"),
        ("qwen3_moe_debug", "dense", "a Hugging Face 'qwen3' model, not 'qwen3_moe'"),
        (
            "qwen3_moe_debug model.shared_expert_ffn_dim=32",
            "moe",
            "model.shared_expert_ffn_dim=32: Hugging Face's Qwen3MoeForCausalLM has no shared",
        ),
    ],
    ids=["moe-into-dense", "dense-into-moe", "shared-expert"],
)
def test_a_folder_the_model_cannot_start_from_is_a_one_line_config_error(
    tmp_path: Path, flavor: str, folder: str, expected: str
) -> None:
    (_hf_model if folder == "moe" else _dense_qwen3)(tmp_path / folder)
    model, *more = flavor.split()
    result = subprocess.run(
        [sys.executable, "-m", "launcher.train", f"model={model}", *more]
        + [f"model.init_from={tmp_path / folder}", "train.steps=1", "device=cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("config error: model.init_from=") and expected in lines[0], lines


def test_the_hubs_30b_a3b_config_fits_its_flavor() -> None:
    # the shape keys of Qwen/Qwen3-30B-A3B's config.json on the hub
    hub = {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 151936,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }
    args = make_config(["model=qwen3_moe_30b_a3b"]).model
    SPEC.hf.check_config(hub, args, Path("config.json"))  # no error
    with pytest.raises(HFFormatError, match=r"decoder_sparse_step=2 \(model needs 1\)"):
        SPEC.hf.check_config({**hub, "decoder_sparse_step": 2}, args, Path("config.json"))

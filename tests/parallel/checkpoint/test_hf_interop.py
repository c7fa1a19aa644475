"""Hugging Face Llama interop, checked against `transformers` itself.

One spawn of 2 gloo ranks: train at tp=2 and save; start from a Hugging Face model at pp=2 and at
tp=2. Then, in this process: export the checkpoint and load it with
`LlamaForCausalLM.from_pretrained`; its logits must equal tridist's, and tridist started from the
HF weights must give the HF model's loss and logits.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from launcher import convert
from launcher.run.build import build_trainer, load_data, model_args
from launcher.run.loop import train
from launcher.run.trainer import Trainer
from models.hf import HFFormatError, HFWeights
from models.llama.hf import LLAMA_HF
from parallel.checkpoint.hf_export import export_to_hf
from parallel.checkpoint.state import CheckpointError
from parallel.dtensor import full_value
from tests.helpers.run_training import make_config
from tests.helpers.spawn import run_ranks

transformers = pytest.importorskip("transformers")  # a test dependency: in the [dev] extra

BASE = [
    "model=debug",
    "train.seq_len=16",
    "train.global_batch_size=4",
    "train.sample_tokens=0",
    "train.val_interval=1000",
    "device=cpu",
]
# Llama 3.1 frequency scaling on, with an original length short enough to change frequencies
ROPE = ["model.rope_scaling=true", "model.rope_original_max_seq_len=64"]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (2, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _logits(trainer: Trainer) -> torch.Tensor:
    return full_value(trainer.model.chunks[0](_batch()[0])).detach()


def _on_two_ranks(ckpt: str, hf_dir: str) -> dict[str, object]:
    """Train at tp=2 (saving at the end); then start from hf_dir at pp=2 and at tp=2."""
    cfg = make_config(BASE + ROPE + ["parallel.tp=2", "train.steps=2", f"checkpoint.dir={ckpt}"], 2)
    trained = train(cfg, load_data(cfg)).trainer
    out: dict[str, object] = {"trained_logits": _logits(trained)}
    cfg = make_config(
        BASE + ["parallel.pp=2", "parallel.microbatches=2", f"model.init_from={hf_dir}"], 2
    )
    pp2 = build_trainer(cfg, load_data(cfg), HFWeights(Path(hf_dir), cfg.model, LLAMA_HF))
    out["pp2_loss"] = pp2.global_mean(pp2.evaluate([_batch()])).item()
    cfg = make_config(BASE + ["parallel.tp=2", f"model.init_from={hf_dir}"], 2)
    tp2 = build_trainer(cfg, load_data(cfg), HFWeights(Path(hf_dir), cfg.model, LLAMA_HF))
    out["tp2_logits"] = _logits(tp2)
    return out


def _hf_model_like_debug(path: Path) -> transformers.LlamaForCausalLM:
    args = model_args(make_config(BASE))
    config = transformers.LlamaConfig(
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_seq_len,
    )
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def interop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("hf")
    hf_model = _hf_model_like_debug(tmp / "hf_in")
    results = run_ranks(2, _on_two_ranks, str(tmp / "ckpt"), str(tmp / "hf_in"))
    # small shards so the export must write several files and the index
    files = export_to_hf(tmp / "ckpt" / "step-00000002", tmp / "hf_out", max_shard_bytes=100_000)
    return {"tmp": tmp, "hf_in": hf_model, "ranks": results, "files": files}


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_export_loads_in_transformers_with_the_same_logits(interop: dict) -> None:
    out = interop["tmp"] / "hf_out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(interop["files"]) > 1
    assert set(index["weight_map"].values()) == {f.name for f in interop["files"]}
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3"
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        hf_logits = model(_batch()[0]).logits
    for rank in interop["ranks"]:  # every tp rank gathered the same full logits
        assert _close(rank["trained_logits"], hf_logits) < 1e-5


def test_training_starts_from_hf_weights_in_any_layout(interop: dict) -> None:
    inputs, targets = _batch()
    with torch.no_grad():
        hf = interop["hf_in"](inputs, labels=None).logits
    hf_loss = torch.nn.functional.cross_entropy(hf.flatten(0, 1), targets.flatten()).item()
    for rank in interop["ranks"]:
        assert abs(rank["pp2_loss"] - hf_loss) / hf_loss < 1e-5
        assert _close(rank["tp2_logits"], hf) < 1e-5


def test_mismatched_hf_model_is_refused_with_the_field(interop: dict) -> None:
    cfg = make_config(BASE + ["model.n_layers=4"])
    # models/ raises its own error (it cannot know parallel/'s CheckpointError)
    with pytest.raises(HFFormatError, match="num_hidden_layers=8 \\(model needs 4\\)"):
        HFWeights(interop["tmp"] / "hf_in", cfg.model, LLAMA_HF)


def test_every_parameter_has_a_hugging_face_name() -> None:
    from models.llama import Transformer

    names = [
        LLAMA_HF.hf_name(n)
        for n, _ in Transformer(model_args(make_config(BASE))).named_parameters()
    ]
    assert len(set(names)) == len(names) and "model.layers.7.mlp.down_proj.weight" in names


V1_ROOT = Path(__file__).resolve().parent / "data" / "v1"  # a stored format-1 checkpoint folder


def test_convert_cli_exports_the_newest_checkpoint_of_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    convert.main(["to-hf", str(V1_ROOT), str(tmp_path / "out")])
    assert "from " + str(V1_ROOT / "step-00000002") in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_size"] == 16
    # the weights are as readable as config.json for others sharing the folder (not 0600)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] and modes["config.json"] & 0o044, (
        modes
    )


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("auto", "auto is a train.resume keyword; convert needs a checkpoint"),
        ("missing", "no complete checkpoint (with manifest.json) there"),
    ],
)
def test_convert_cli_without_a_checkpoint_is_a_one_line_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # `auto` names no folder here
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["to-hf", where, "out"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("checkpoint error: ") and expected in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def _escape_in_manifest(d: Path, outside: Path) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"]["../../etc/hostname"] = {"bytes": 1, "crc32": 0}
    (d / "manifest.json").write_text(json.dumps(manifest))


def _shard_links_outside(d: Path, outside: Path) -> None:
    shard = next((d / "model").glob("*.safetensors"))
    shutil.copy(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)  # the name is listed; the bytes are elsewhere


def _unlisted_shard(d: Path, outside: Path) -> None:
    shard = next((d / "model").glob("*.safetensors"))
    shutil.copy(shard, shard.with_name("shard-00009-model-00001-of-00001.safetensors"))


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (_escape_in_manifest, ["manifest.json", "'../../etc/hostname'", "refused before reading"]),
        (_shard_links_outside, ["manifest.json", "is not a file of model/ or optim/ inside"]),
        (_unlisted_shard, ["shard-00009", "not in the manifest"]),
    ],
    ids=["dotdot-entry", "symlink-out", "unlisted"],
)
def test_export_reads_only_the_files_the_manifest_lists_inside_the_checkpoint(
    tmp_path: Path, break_it: Callable[[Path, Path], None], expected: list[str]
) -> None:
    checkpoint = tmp_path / "step-00000002"
    shutil.copytree(V1_ROOT / "step-00000002", checkpoint)
    break_it(checkpoint, tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError) as err:
        export_to_hf(checkpoint, tmp_path / "out")
    for part in expected:
        assert part in str(err.value), err.value
    assert not (tmp_path / "out").exists()  # refused before writing (or reading) anything

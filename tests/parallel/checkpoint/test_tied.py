"""A tied model (llama3_1b's shape rules, shrunk) across pipeline stages: trained at pp=2 through
the run library, its checkpoint stores the tied matrix once and reshards into other tied layouts
(a V placement, dp=2 without pipelining) with the same continued losses, exports to Hugging Face
with `tie_word_embeddings: true`, and a pp=2 run starts from that export with its loss.

One spawn of 2 gloo ranks; the checks against `transformers` run in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

from launcher.run.build import build_trainer, load_data
from launcher.run.checkpointing import load_trainer
from launcher.run.loop import train
from models.hf import HFWeights
from models.llama.hf import LLAMA_HF
from parallel.checkpoint.format import part_tensors
from parallel.checkpoint.hf_export import export_to_hf
from tests.helpers.run_training import make_config
from tests.helpers.spawn import run_ranks

transformers = pytest.importorskip("transformers")  # a test dependency: in the [dev] extra

TINY_1B = [  # model=llama3_1b (tied, GQA, Llama 3.1 rope scaling) at the debug model's size
    "model=llama3_1b",
    "model.dim=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=256",
    "model.multiple_of=32",
    "model.max_seq_len=64",
    "model.rope_original_max_seq_len=32",
]
BASE = TINY_1B + [
    "train.seq_len=16",
    "train.global_batch_size=8",
    "train.sample_tokens=0",
    "train.val_interval=1000",
    "optim.warmup_steps=1",
    "optim.eps=1e-5",
    "device=cpu",
    "parallel.microbatches=2",
]
PP2 = ["parallel.pp=2"]
LAYOUTS = {
    "pp2": PP2,
    "zbv": PP2 + ["parallel.schedule=zbv", "parallel.virtual_stages=2"],
    "dp2": ["parallel.dp=2"],
}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (2, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _on_two_ranks(ckpt: str, hf_dir: str) -> dict[str, object]:
    cfg = make_config(BASE + PP2 + ["train.steps=2", f"checkpoint.dir={ckpt}"], 2)
    train(cfg, load_data(cfg))
    saved = Path(ckpt) / "step-00000002"
    if dist.get_rank() == 0:
        export_to_hf(saved, Path(hf_dir))
    dist.barrier()  # the export is on disk before any rank reads it
    out: dict[str, object] = {}
    for name, layout in LAYOUTS.items():
        cfg = make_config(BASE + layout + ["train.steps=4"], 2)
        trainer = build_trainer(cfg, load_data(cfg))
        load_trainer(saved, trainer, verify=True)
        out[f"{name}_val"] = trainer.global_mean(trainer.evaluate([_batch()])).item()
        out[name] = [trainer.global_mean(trainer.train_step().loss).item() for _ in range(2)]
    cfg = make_config(BASE + PP2 + [f"model.init_from={hf_dir}"], 2)
    from_hf = build_trainer(cfg, load_data(cfg), HFWeights(Path(hf_dir), cfg.model, LLAMA_HF))
    out["from_hf_val"] = from_hf.global_mean(from_hf.evaluate([_batch()])).item()
    return out


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("tied")
    ranks = run_ranks(2, _on_two_ranks, str(tmp / "ckpt"), str(tmp / "hf"))
    return {"tmp": tmp, "ranks": ranks}


def test_checkpoint_stores_the_tied_matrix_once(tied: dict) -> None:
    step = tied["tmp"] / "ckpt" / "step-00000002"
    model = part_tensors(step / "model")
    assert "tok_embeddings.weight" in model and "output.weight" not in model
    optim = part_tensors(step / "optim")
    assert not [k for k in optim if k.startswith("output.")], sorted(optim)[:5]


def test_tied_checkpoint_reshards_with_the_same_losses(tied: dict) -> None:
    for rank in tied["ranks"]:
        for name in ("zbv", "dp2"):
            for a, b in zip(rank[name], rank["pp2"]):
                assert abs(a - b) / b <= 1e-5, (name, rank[name], rank["pp2"])
            assert abs(rank[f"{name}_val"] - rank["pp2_val"]) / rank["pp2_val"] <= 1e-5


def test_export_is_tied_and_a_pp2_run_starts_from_it(tied: dict) -> None:
    hf = tied["tmp"] / "hf"
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(hf / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = transformers.LlamaForCausalLM.from_pretrained(hf).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    inputs, targets = _batch()
    with torch.no_grad():
        logits = model(inputs).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    for rank in tied["ranks"]:
        # the exported weights are the checkpoint's: the loaded runs evaluate to HF's loss
        assert abs(rank["pp2_val"] - hf_loss) / hf_loss <= 1e-5, (rank["pp2_val"], hf_loss)
        assert abs(rank["from_hf_val"] - hf_loss) / hf_loss <= 1e-5, (rank["from_hf_val"], hf_loss)

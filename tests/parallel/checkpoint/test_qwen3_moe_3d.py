"""Qwen3-MoE with expert parallelism in a 3D layout, checked against one process and against
transformers itself.

One spawn of 8 gloo ranks: train `model=qwen3_moe_debug` 2 steps at ep=2 x pp=2 x tp=2 (dp=2)
and save, then resume that checkpoint for a third step at ep=4 x pp=2 (dp=4, tp=1): the experts
are resharded from 4 to 2 per rank. The losses equal a single-process run's within 1e-5 (the
router's balance and z-losses are trained too: their gradients change the third loss), and the
third step's checkpoint, exported, loads in `Qwen3MoeForCausalLM` with that run's logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from launcher.config import ConfigError
from launcher.run.build import load_data
from launcher.run.loop import train
from models.moe import MoE
from parallel.checkpoint.hf_export import export_to_hf
from parallel.dtensor import full_value
from parallel.expert_load import expert_load
from parallel.expert_parallel import ExpertParallelDispatch
from tests.helpers.run_training import make_config
from tests.helpers.spawn import run_ranks

transformers = pytest.importorskip("transformers")  # a test dependency: in the [dev] extra

BASE = [
    "model=qwen3_moe_debug",
    "train.seq_len=16",
    "train.global_batch_size=8",
    "train.sample_tokens=0",
    "train.val_interval=1000",
    "optim.warmup_steps=1",
    "optim.eps=1e-5",  # see tests/parallel/test_parity.py: rounding-noise gradients stay still
    "device=cpu",
]
EP2_PP2_TP2 = ["parallel.dp=2", "parallel.ep=2", "parallel.pp=2", "parallel.tp=2"]
EP4_PP2 = ["parallel.dp=4", "parallel.ep=4", "parallel.pp=2"]


def _batch() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))


def _experts_here(summary: object) -> tuple[int, bool]:
    """(experts held per MoE layer on this rank, whether tokens go by all-to-all)."""
    moes = [m for c in summary.trainer.model.chunks for m in c.modules() if isinstance(m, MoE)]
    local = moes[0].experts.w1.to_local().shape[0]
    return local, all(isinstance(m.dispatch, ExpertParallelDispatch) for m in moes)


def _on_eight_ranks(ckpt: str) -> dict[str, object]:
    saving = [f"checkpoint.dir={ckpt}", "checkpoint.interval=1", "parallel.microbatches=4"]
    cfg = make_config(BASE + EP2_PP2_TP2 + saving + ["train.steps=2"], 8)
    first = train(cfg, load_data(cfg))
    assert first.trainer is not None
    first.trainer.train_step()  # one more (unsaved) step: the metrics of its expert load
    load = expert_load(first.trainer.model.chunks, n_layers=4, n_experts=8)
    resumed_layout = [f"checkpoint.dir={ckpt}", "parallel.microbatches=2"]
    cfg = make_config(BASE + EP4_PP2 + resumed_layout + ["train.steps=3", "train.resume=auto"], 8)
    resumed = train(cfg, load_data(cfg))
    return {
        "losses": first.losses + resumed.losses,
        "experts": [_experts_here(first), _experts_here(resumed)],
        "load": load,
    }


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("qwen3_moe")
    ranks = run_ranks(8, _on_eight_ranks, str(tmp / "ckpt"))
    cfg = make_config(BASE + ["train.steps=3", "checkpoint.final=false"])
    reference = train(cfg, load_data(cfg))
    assert reference.trainer is not None
    logits = full_value(reference.trainer.model.chunks[0](_batch())).detach()
    export_to_hf(tmp / "ckpt" / "step-00000003", tmp / "hf_out")
    no_aux = make_config(
        BASE
        + ["train.steps=3", "checkpoint.final=false", "model.moe_aux_loss_coeff=0"]
        + ["model.moe_z_loss_coeff=0"]
    )
    return {
        "tmp": tmp,
        "ranks": ranks,
        "losses": reference.losses,
        "logits": logits,
        "no_aux": train(no_aux, load_data(no_aux)).losses,
    }


@pytest.mark.long(30)
def test_ep_pp_tp_trains_and_resumes_at_another_ep_equal_to_one_process(moe_runs: dict) -> None:
    for rank in moe_runs["ranks"]:
        assert rank["experts"] == [(4, True), (2, True)]  # 8 experts over ep=2, then ep=4
        losses = rank["losses"]
        assert len(losses) == 3, losses
        rel = max(abs(a - b) / b for a, b in zip(losses, moe_runs["losses"]))
        assert rel <= 1e-5, (losses, moe_runs["losses"])
        load = rank["load"]  # the same on every rank: summed over all of them
        assert load == moe_runs["ranks"][0]["load"]
        assert 1 < load["moe/load_max_over_mean"] < 8 and 0 < load["moe/aux_loss"] < 1, load
    # the auxiliary losses train the router: without them the third step differs
    assert abs(moe_runs["no_aux"][2] - moe_runs["losses"][2]) > 1e-4


@pytest.mark.long(5)
def test_the_ep_checkpoint_exports_to_transformers_with_the_same_logits(moe_runs: dict) -> None:
    out = moe_runs["tmp"] / "hf_out"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["num_experts"] == 8
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        hf_logits = model(_batch()).logits
    err = (hf_logits - moe_runs["logits"]).abs().max() / hf_logits.abs().max()
    assert err.item() < 1e-5


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel.dp=4", "parallel.ep=3"], 4, r"parallel.ep=3: .*must divide it"),
        (
            ["parallel.dp=4", "parallel.ep=4", "model.n_experts=6"],
            4,
            r"parallel.ep=4: must divide model.n_experts=6",
        ),
        (["model.experts_per_token=9"], 1, r"model.experts_per_token=9: top-k must be in \[1, "),
        (["model=debug", "parallel.dp=2", "parallel.ep=2"], 2, r"parallel.ep=2: .*needs a Mix"),
        (["parallel.cp=2"], 2, r"parallel.cp=2: context parallelism with a MoE model"),
    ],
)
def test_bad_moe_settings_are_refused_naming_the_field(
    overrides: list[str], world: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(BASE + overrides, world)

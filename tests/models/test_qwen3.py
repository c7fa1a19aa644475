"""Qwen3 dense against transformers' `Qwen3ForCausalLM`, both ways through the Hugging Face
layout (names, rotary permutation of q/k rows and of the per-head QK-norm weights)."""

from __future__ import annotations

import torch

from models.args import ModelArgs
from models.registry import model_spec, parameter_count

transformers = __import__("pytest").importorskip("transformers")  # in the [dev] extra

# head width decoupled from dim / n_heads (4 x 24 != 32), GQA, tied embeddings, rope theta 1e6
ARGS = ModelArgs(
    family="qwen3",
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_size=24,
    ffn_dim=48,
    vocab_size=64,
    norm_eps=1e-6,
    rope_theta=1e6,
    max_seq_len=64,
    tie_embeddings=True,
)
SPEC = model_spec("qwen3")


def _hf_model() -> torch.nn.Module:
    config = transformers.Qwen3Config(**SPEC.hf.config(ARGS, torch.float32))
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so a wrong QK-norm permutation shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def test_logits_equal_transformers_both_ways() -> None:
    hf = _hf_model()
    ours = SPEC.build(ARGS).eval()
    hf_state = hf.state_dict()
    with torch.no_grad():
        for name, p in ours.named_parameters():  # import: HF layout -> tridist layout
            p.copy_(SPEC.hf.from_hf_tensor(name, hf_state[SPEC.hf.hf_name(name)], ARGS))
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(tokens).logits, ours(tokens)
    assert (got - expected).abs().max() / expected.abs().max() < 1e-5
    # export: tridist layout -> HF layout gives back exactly the HF tensors
    for name, p in ours.named_parameters():
        assert torch.equal(
            SPEC.hf.to_hf_tensor(name, p.detach(), ARGS), hf_state[SPEC.hf.hf_name(name)]
        )


def test_parameter_count_is_the_built_models() -> None:
    built = sum(p.numel() for p in SPEC.build(ARGS).parameters())  # a tied matrix counted once
    assert parameter_count(ARGS) == built == sum(p.numel() for p in _hf_model().parameters())

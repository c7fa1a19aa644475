"""The plain model: shapes, causality, GQA == MHA with repeated weights, seeded init."""

import dataclasses

import pytest
import torch

from models.llama import ModelArgs, Transformer
from models.registry import parameter_count
from parallel.init import init_parameters

ARGS = ModelArgs(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64
)


def _model(args: ModelArgs = ARGS, seed: int = 0) -> Transformer:
    model = Transformer(args)
    init_parameters(model, args, seed)
    return model


def test_shapes_and_ffn_sizing() -> None:
    logits = _model()(torch.randint(0, 64, (3, 10)))
    assert logits.shape == (3, 10, 64)
    assert (
        ModelArgs(dim=4096, multiple_of=1024, ffn_dim_multiplier=1.3).ffn_hidden_dim == 14336
    )  # Llama 3 8B


def test_causal() -> None:
    model = _model()
    x = torch.randint(0, 64, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 64
    assert torch.allclose(model(x)[:, :8], model(y)[:, :8], atol=1e-6)
    assert not torch.allclose(model(x)[:, 8:], model(y)[:, 8:])


def test_gqa_equals_mha_with_repeated_kv_weights() -> None:
    gqa = _model()
    mha_args = ModelArgs(**{**ARGS.__dict__, "n_kv_heads": 4})
    mha = Transformer(mha_args)
    state = gqa.state_dict()
    hd, rep = ARGS.head_dim, ARGS.n_heads // ARGS.kv_heads
    for name, value in state.items():
        if name.endswith(("wk.weight", "wv.weight")):
            value = (
                value.view(ARGS.kv_heads, hd, -1)
                .repeat_interleave(rep, dim=0)
                .reshape(-1, ARGS.dim)
            )
        mha.state_dict()[name].copy_(value)
    x = torch.randint(0, 64, (2, 9))
    assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_same_seed_same_weights_other_seed_differs() -> None:
    a, b, c = _model(seed=1).state_dict(), _model(seed=1).state_dict(), _model(seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attention.wq.weight"], c["layers.0.attention.wq.weight"])


def test_rope_scaling_changes_only_low_frequencies() -> None:
    from models.llama import rope_frequencies

    args = ModelArgs(dim=128, n_heads=1, rope_theta=500000.0)
    plain, scaled = (
        rope_frequencies(args),
        rope_frequencies(ModelArgs(**{**args.__dict__, "rope_scaling": True})),
    )
    assert torch.equal(plain[:4], scaled[:4]) and torch.allclose(scaled[-1], plain[-1] / 8)


def test_blocks_use_the_first_positions_of_longer_rope_tables() -> None:
    # sequence parallelism hands a block a shorter hidden state than the sequence its attention
    # sees, so the tables are built for max_seq_len and each attention takes what it needs
    model = _model()
    block, x = model.layers["0"], torch.randn(2, 10, ARGS.dim)
    long_cos, long_sin = model.rope(ARGS.max_seq_len, x.device)
    short_cos, short_sin = model.rope(10, x.device)
    assert torch.equal(long_cos[:10], short_cos) and long_cos.shape[0] == ARGS.max_seq_len
    assert torch.equal(block(x, long_cos, long_sin), block(x, short_cos, short_sin))
    # RoPE is relative: a shift of all positions changes nothing, but other distances must
    stretched = block(x, long_cos[::2], long_sin[::2])  # positions 0, 2, 4, ...
    assert (stretched - block(x, long_cos, long_sin)).abs().max() > 1e-5  # rounding is ~1e-7


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_is_the_modules(tie: bool) -> None:
    args = dataclasses.replace(ARGS, ffn_dim_multiplier=1.3, tie_embeddings=tie)
    with torch.device("meta"):
        model = Transformer(args)
    assert parameter_count(args) == sum(p.numel() for p in model.parameters())

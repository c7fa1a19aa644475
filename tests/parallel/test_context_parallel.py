"""Context-parallel attention on a bare cp mesh: forward equals one process's causal attention
on the whole sequence, gradients of q/k/v match it; chunks are load-balanced and RoPE follows
them."""

import torch

from models.llama import Attention, CausalCore, ModelArgs, Transformer
from parallel.context_parallel import (
    AllGatherCausalCore,
    apply_context_parallel,
    chunk_positions,
    shard_sequence,
)
from parallel.ring_attention import RingCausalCore
from tests.helpers.spawn import run_on_mesh

B, H, H_KV, S, D = 2, 4, 2, 32, 8  # GQA: two query heads per K/V head


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (H, H_KV, H_KV))
    grad = torch.randn(B, H, S, D, generator=g)
    return q, k, v, grad


def _attend(core: torch.nn.Module, q, k, v, grad, shard) -> tuple[torch.Tensor, ...]:
    """Output and q/k/v gradients of `core` on the sequence slices `shard` picks."""
    q, k, v = (shard(t).clone().requires_grad_() for t in (q, k, v))
    out = core(q, k, v)
    out.backward(shard(grad))
    return out.detach(), q.grad, k.grad, v.grad


def _cores_on_mesh(mesh) -> dict[str, tuple[torch.Tensor, ...]]:
    cp = mesh["cp"]
    q, k, v, grad = _inputs()
    results = {}
    for name, core in (("all_gather", AllGatherCausalCore(cp)), ("ring", RingCausalCore(cp))):
        results[name] = _attend(core, q, k, v, grad, lambda t: shard_sequence(t, cp, dim=2))
    # a model block: RoPE rows follow the chunks (attention output of the whole block)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=S)
    torch.manual_seed(0)
    model = Transformer(args)
    x = torch.randn(B, S, args.dim, generator=torch.Generator().manual_seed(1))
    cos, sin = model.rope(S, x.device)
    attention = model.layers["0"].attention
    full = attention(x, cos, sin).detach()
    apply_context_parallel(model, cp, "ring")
    local = attention(shard_sequence(x, cp), cos, sin).detach()
    results["block"] = (shard_sequence(full, cp), local)
    return results


def test_cp_attention_matches_whole_sequence() -> None:
    cp = 4  # every ring case: own block, blocks of lower and of higher ranks
    q, k, v, grad = _inputs()
    # reference: one process, whole sequence; then each rank's chunks of it
    ref_out, ref_dq, ref_dk, ref_dv = _attend(CausalCore(), q, k, v, grad, lambda t: t)
    per_rank = run_on_mesh((1, 1, 1), _cores_on_mesh, cp=cp)
    for rank, results in enumerate(per_rank):
        full_block, local_block = results["block"]
        assert (local_block - full_block).abs().max() < 1e-6, rank
        rows = chunk_positions(S, cp, rank)
        for name in ("all_gather", "ring"):
            out, dq, dk, dv = results[name]
            assert (out - ref_out[:, :, rows]).abs().max() < 1e-6, (name, rank)
            assert (dq - ref_dq[:, :, rows]).abs().max() < 1e-5, (name, rank)
            # K/V gradients sum the contributions of every rank's queries
            assert (dk - ref_dk[:, :, rows]).abs().max() < 1e-5, (name, rank)
            assert (dv - ref_dv[:, :, rows]).abs().max() < 1e-5, (name, rank)


def test_chunks_are_load_balanced_and_cover_the_sequence() -> None:
    cp, s = 4, 64
    held = [chunk_positions(s, cp, r) for r in range(cp)]
    assert sorted(torch.cat(held).tolist()) == list(range(s))
    # causal work of a query at position p is p + 1 keys: the same total on every rank
    work = {int((positions + 1).sum()) for positions in held}
    assert len(work) == 1, work
    assert held[0][:8].tolist() == list(range(8)) and held[0][8:].tolist() == list(range(56, 64))


def test_model_attention_core_is_plain_sdpa() -> None:
    attention = Attention(ModelArgs(dim=32, n_heads=4, n_kv_heads=2))
    assert isinstance(attention.core, CausalCore) and not list(attention.core.parameters())

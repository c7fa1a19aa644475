"""Context-parallel attention on a bare cp mesh: forward equals one process's causal attention
on the whole sequence, gradients of q/k/v match it; chunks are load-balanced and RoPE follows
them."""

from typing import Any

import pytest
import torch
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

from launcher.benchmarks.activation_memory import SavedActivationTracker
from models.llama import Attention, CausalCore, ModelArgs, Transformer
from parallel.context_parallel import (
    AllGatherCausalCore,
    apply_context_parallel,
    chunk_positions,
    shard_sequence,
)
from parallel.plan.comm import cp_bytes
from parallel.plan.layout import RankContext
from parallel.plan.memory import block_activation_elements, cp_kv_buffer_elements
from parallel.ring_attention import RingCausalCore, ring_backward, ring_forward
from tests.helpers.spawn import run_on_mesh

B, H, H_KV, S, D = 2, 4, 2, 32, 8  # GQA: two query heads per K/V head
_RING_BODIES = {
    torch.ops.tridist.ring_attention.default: ring_forward,
    torch.ops.tridist.ring_attention_backward.default: ring_backward,
}
LONG = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=512)


class _SentBytes(TorchDispatchMode):
    """Bytes this rank sends through CP's collectives and point-to-point ops, ring-counted:
    an all-gather sends its input to the cp-1 others, a reduce-scatter (cp-1)/cp of its input."""

    def __init__(self, cp: int) -> None:
        super().__init__()
        self.cp, self.sent = cp, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func.overloadpacket)
        first = args[0] if args else []  # c10d.send takes a list of tensors
        leaves = torch.utils._pytree.tree_leaves(first)
        nbytes = sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
        if "all_gather_into_tensor" in name:
            self.sent += (self.cp - 1) * nbytes
        elif "reduce_scatter_tensor" in name:
            self.sent += (self.cp - 1) / self.cp * nbytes
        elif name.endswith("c10d.send"):
            self.sent += nbytes
        elif func in _RING_BODIES:  # an opaque custom op: run its body here to see its sends
            with self:
                return _RING_BODIES[func](*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (H, H_KV, H_KV))
    grad = torch.randn(B, H, S, D, generator=g)
    return q, k, v, grad


def _documents() -> torch.Tensor:
    """Document ids [B, S]: short and long documents, some across chunk and rank boundaries (row
    0), one document (row 1)."""
    starts = torch.zeros(B, S, dtype=torch.long)
    starts[0, [3, 4, 13, 20, 21, 30]] = 1
    return starts.cumsum(1)


def _attend(core: torch.nn.Module, q, k, v, grad, shard, **kw) -> tuple[torch.Tensor, ...]:
    """Output and q/k/v gradients of `core` on the sequence slices `shard` picks."""
    q, k, v = (shard(t).clone().requires_grad_() for t in (q, k, v))
    out = core(q, k, v, **kw)
    out.backward(shard(grad))
    return out.detach(), q.grad, k.grad, v.grad


def _cores_on_mesh(mesh) -> dict[str, tuple[torch.Tensor, ...]]:
    cp = mesh["cp"]
    q, k, v, grad = _inputs()
    results = {}
    for name, core in (("all_gather", AllGatherCausalCore(cp)), ("ring", RingCausalCore(cp))):
        results[name] = _attend(core, q, k, v, grad, lambda t: shard_sequence(t, cp, dim=2))
        # block-causal: the whole sequence's document ids on every rank
        results[f"{name}_docs"] = _attend(
            core, q, k, v, grad, lambda t: shard_sequence(t, cp, dim=2), doc_ids=_documents()
        )
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
    results |= _traffic_and_memory(cp)
    return results


def _step(model: Transformer, tokens: torch.Tensor) -> SavedActivationTracker:
    with SavedActivationTracker() as saved:
        out = model(tokens)
    out.float().square().mean().backward()
    return saved


def _traffic_and_memory(cp_mesh: Any) -> dict[str, Any]:
    """A 2-block model on a long sequence: bytes sent per forward+backward under each CP
    variant (and CommDebugMode's count of the all-gather's collectives), and the activations
    autograd keeps, against one process holding the whole sequence."""
    tokens = torch.randint(0, LONG.vocab_size, (1, LONG.max_seq_len), generator=torch.Generator())
    out: dict[str, Any] = {"memory_full": _step(Transformer(LONG), tokens).peak}
    for comm in ("all_gather", "ring"):
        model = Transformer(LONG)
        apply_context_parallel(model, cp_mesh, comm)
        with CommDebugMode() as counts, _SentBytes(cp_mesh.size()) as sent:
            saved = _step(model, shard_sequence(tokens, cp_mesh))
        out[f"traffic_{comm}"] = (
            sent.sent,
            {str(k): n for k, n in counts.get_comm_counts().items()},
            saved.peak,
        )
    return out


CP = 4  # every ring case: own block, blocks of lower and of higher ranks


@pytest.fixture(scope="module")
def cp4() -> list[dict[str, Any]]:
    return run_on_mesh((1, 1, 1), _cores_on_mesh, cp=CP)


def test_cp_attention_matches_whole_sequence(cp4: list[dict[str, Any]]) -> None:
    cp = CP
    q, k, v, grad = _inputs()
    # reference: one process, whole sequence; then each rank's chunks of it
    ref = _attend(CausalCore(), q, k, v, grad, lambda t: t)
    ref_docs = _attend(CausalCore(), q, k, v, grad, lambda t: t, doc_ids=_documents())
    for rank, results in enumerate(cp4):
        full_block, local_block = results["block"]
        assert (local_block - full_block).abs().max() < 1e-6, rank
        rows = chunk_positions(S, cp, rank)
        for name in ("all_gather", "ring", "all_gather_docs", "ring_docs"):
            out, dq, dk, dv = results[name]
            ref_out, ref_dq, ref_dk, ref_dv = ref_docs if name.endswith("_docs") else ref
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


def test_planner_cp_traffic_and_memory_match_the_real_attention(
    cp4: list[dict[str, Any]],
) -> None:
    cp = CP
    tokens = LONG.max_seq_len // cp  # per rank
    for rank, results in enumerate(cp4):
        for comm in ("all_gather", "ring"):
            sent, counts, peak = results[f"traffic_{comm}"]
            whole = RankContext(args=LONG, layers=LONG.n_layers, tokens=tokens, cp=cp, cp_comm=comm)
            planned = cp_bytes(whole, dtype_bytes=4)  # fp32 here
            assert sent == planned, (comm, rank, sent, planned)
            if comm == "all_gather":  # one all-gather forward, one reduce-scatter backward
                assert sorted(counts.values()) == [LONG.n_layers] * 2, counts
            # what the planner says the blocks keep, against what autograd kept
            per_token = block_activation_elements(LONG, 1, False, "none")
            extra = cp_kv_buffer_elements(LONG, 1, cp, comm, "none")
            ratio = (per_token + extra) / per_token / cp  # planned share of one process's blocks
            measured = peak / results["memory_full"]
            assert abs(measured - ratio) < 0.35 * ratio, (comm, rank, measured, ratio)
        # the ring holds close to 1/cp of one process's activations; all-gather the K/V on top
        ring, all_gather = results["traffic_ring"][2], results["traffic_all_gather"][2]
        assert ring < all_gather and ring < 1.3 * results["memory_full"] / cp, (ring, all_gather)

"""Context parallelism over the `cp` mesh dim: every sequence is split across the cp ranks in
load-balanced chunks, and attention sees the whole sequence by all-gathering K/V (the Llama 3
paper's choice, cheap with GQA) or by passing K/V blocks around a ring (parallel/ring_attention.py).

Applied from outside the model, as TP is: each block's parameter-free `attention.core` is
swapped for one that attends over the cp group, and a forward pre-hook hands the attention the
RoPE rows of the positions this rank holds. Everything else in a block is per-token and runs on
the local chunks unchanged.

Written by hand: torch's `context_parallel()` does not train on CPU in torch 2.13 (no sharding
strategy for the CPU flash-attention op, MATH fails on mixed Tensor/DTensor, flex attention has
no CPU backward). On CUDA the ring uses torch's own ring attention (see ring_attention.py) and
the all-gather torch's bottom-right causal bias; neither CUDA path has run here (no GPU).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_gather_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from models.decoder import Decoder, document_causal_mask
from parallel.ring_attention import (
    RingCausalCore,
    chunk_positions,
    expand_kv,
    flash_piece,
    flash_piece_backward,
    fold_kv_grads,
    merge_attention,
)

CP_COMM = ("all_gather", "ring")
__all__ = ["CP_COMM", "apply_context_parallel", "chunk_positions", "shard_sequence"]


def shard_sequence(x: torch.Tensor, cp_mesh: DeviceMesh, dim: int = 1) -> torch.Tensor:
    """This cp rank's load-balanced chunks of x along `dim` (the sequence); identity at cp=1."""
    cp = cp_mesh.size()
    if cp == 1:
        return x
    rank = cp_mesh.get_local_rank()
    chunks = x.chunk(2 * cp, dim)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim)


def gathered_order(cp: int) -> list[int]:
    """Index, in the all-gathered rank order [r0's 2 chunks, r1's, ...], of chunk 0, 1, ..., 2cp−1."""
    return [2 * g if g < cp else 2 * (2 * cp - 1 - g) + 1 for g in range(2 * cp)]


def _pieces(rank: int, cp: int, c: int) -> list[tuple[int, slice, slice, slice, bool]]:
    """(local chunk, query rows, their sequence positions, key columns, causal) of each attention
    piece of rank's queries: every query chunk sees its own chunk causally and all keys before
    it in full."""
    pieces = []
    for t, chunk in enumerate((rank, 2 * cp - 1 - rank)):
        rows, own = slice(t * c, (t + 1) * c), slice(chunk * c, (chunk + 1) * c)
        pieces.append((t, rows, own, own, True))
        if chunk > 0:
            pieces.append((t, rows, own, slice(0, chunk * c), False))
    return pieces


def _ids(doc_ids: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if doc_ids is None else doc_ids[:, part]


def gathered_forward(
    q: torch.Tensor, kv: torch.Tensor, rank: int, cp: int, doc_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local q [b, h, s/cp, d] over the whole sequence's packed K/V [b, 2·h_kv, s, d] -> (out, lse).

    No s x s mask: each piece is plain or square-causal flash attention, merged by log-sum-exp
    (a boolean mask would be kept for backward as a float matrix, quadratic in s). doc_ids
    [b, s]: block-causal, each piece masked by its documents (made again in backward)."""
    repeats, c = q.shape[1] // (kv.shape[1] // 2), q.shape[2] // 2
    outs: list[torch.Tensor | None] = [None, None]
    lses: list[torch.Tensor | None] = [None, None]
    for t, rows, own, cols, causal in _pieces(rank, cp, c):
        kb, vb = expand_kv(kv[:, :, cols], repeats)
        o, lse = flash_piece(q[:, :, rows], kb, vb, causal, _ids(doc_ids, own), _ids(doc_ids, cols))
        prev_o, prev_lse = outs[t], lses[t]
        if prev_o is None or prev_lse is None:
            outs[t], lses[t] = o.float(), lse
        else:
            outs[t], lses[t] = merge_attention(prev_o, prev_lse, o, lse)
    out = torch.cat([o for o in outs if o is not None], dim=2).to(q.dtype)
    return out.contiguous(), torch.cat([x for x in lses if x is not None], dim=-1).contiguous()


def gathered_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    rank: int,
    cp: int,
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of gathered_forward: dq and the whole sequence's packed [dk, dv]."""
    grad_out = grad_out.contiguous()
    repeats, c = q.shape[1] // (kv.shape[1] // 2), q.shape[2] // 2
    dq = torch.zeros_like(q, dtype=torch.float32)
    dkv = torch.zeros_like(kv, dtype=torch.float32)
    for _, rows, own, cols, causal in _pieces(rank, cp, c):
        kb, vb = expand_kv(kv[:, :, cols], repeats)
        # the merged out and lse make each piece's gradient exact (flash backward's rule)
        g = flash_piece_backward(
            grad_out[:, :, rows],
            q[:, :, rows],
            kb,
            vb,
            out[:, :, rows],
            lse[..., rows],
            causal,
            _ids(doc_ids, own),
            _ids(doc_ids, cols),
        )
        dq[:, :, rows] += g[0]
        dkv[:, :, cols] += fold_kv_grads(g[1], g[2], repeats)
    return dq.to(q.dtype).contiguous(), dkv.to(kv.dtype).contiguous()


# Custom ops, as the ring's (parallel/ring_attention.py): one compiled graph, the same code eager.
gathered_attention = torch.library.custom_op(
    "tridist::gathered_attention", gathered_forward, mutates_args=()
)
gathered_attention_backward = torch.library.custom_op(
    "tridist::gathered_attention_backward", gathered_backward, mutates_args=()
)


@gathered_attention.register_fake
def _(
    q: torch.Tensor, kv: torch.Tensor, rank: int, cp: int, doc_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@gathered_attention_backward.register_fake
def _(
    grad_out: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, *_: Any
) -> tuple[torch.Tensor, ...]:
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    q, kv, ctx.rank, ctx.cp, doc_ids = inputs
    # K/V un-repeated: GQA's copies are made again; doc_ids integers, no gradient
    ctx.save_for_backward(q, kv, *output, doc_ids)


def _backward(
    ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    q, kv, out, lse, doc_ids = ctx.saved_tensors
    dq, dkv = gathered_attention_backward(grad_out, q, kv, out, lse, ctx.rank, ctx.cp, doc_ids)
    return dq, dkv, None, None, None


gathered_attention.register_autograd(_backward, setup_context=_setup_context)
GATHERED_OP = torch.ops.tridist.gathered_attention.default  # as selective recompute sees it


class AllGatherCausalCore(nn.Module):
    """Causal GQA attention of the local queries over the whole sequence's K/V, all-gathered
    across cp (un-repeated: traffic scales with the K/V heads). Each local query chunk attends
    to the keys up to its own end only, so every rank does the same work."""

    def __init__(self, cp_mesh: DeviceMesh) -> None:
        super().__init__()
        self.cp_mesh = cp_mesh

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q [b, h, s/cp, d], k/v [b, h_kv, s/cp, d] (this rank's chunks) -> [b, h, s/cp, d];
        doc_ids [b, s]: the whole sequence's document ids (block-causal)."""
        cp, rank = self.cp_mesh.size(), self.cp_mesh.get_local_rank()
        # the one collective: K and V of every cp rank, sequence first (the gathered dim), in
        # rank order; backward reduce-scatters their gradients back
        kv = torch.cat([k, v], 1).movedim(2, 0).contiguous()
        pieces = all_gather_single_autograd(kv, 0, self.cp_mesh).movedim(0, 2).chunk(2 * cp, 2)
        kv_all = torch.cat([pieces[i] for i in gathered_order(cp)], 2)
        if q.is_cuda and doc_ids is not None:
            return _document_sdpa(q, kv_all, rank, cp, doc_ids)
        if q.is_cuda:
            return _lower_right_sdpa(q, kv_all, rank, cp)
        return gathered_attention(q, kv_all, rank, cp, doc_ids)[0]


def _document_sdpa(
    q: torch.Tensor, kv: torch.Tensor, rank: int, cp: int, doc_ids: torch.Tensor
) -> torch.Tensor:
    """CUDA with documents: the local queries' rows of the whole sequence's block-causal mask,
    one SDPA (correct by construction, a [b, 1, s/cp, s] mask; not verified here: no GPU)."""
    k_all, v_all = expand_kv(kv, q.shape[1] // (kv.shape[1] // 2))
    rows = chunk_positions(doc_ids.shape[1], cp, rank, q.device)
    mask = document_causal_mask(doc_ids)[:, :, rows]
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)


def _lower_right_sdpa(q: torch.Tensor, kv: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    """CUDA: each local query chunk over the keys up to its end with torch's bottom-right causal
    bias, which its memory-efficient kernel applies without a mask (not verified here: no GPU)."""
    from torch.nn.attention.bias import causal_lower_right

    repeats, c = q.shape[1] // (kv.shape[1] // 2), q.shape[2] // 2
    k_all, v_all = expand_kv(kv, repeats)
    outs = []
    for q_chunk, chunk in zip(q.chunk(2, dim=2), (rank, 2 * cp - 1 - rank)):
        end = (chunk + 1) * c
        bias = causal_lower_right(c, end)
        outs.append(
            F.scaled_dot_product_attention(q_chunk, k_all[:, :, :end], v_all[:, :, :end], bias)
        )
    return torch.cat(outs, dim=2)


def _rope_rows_hook(cp_mesh: DeviceMesh) -> Any:
    """A forward pre-hook for Attention(x, cos, sin): the cos/sin rows of the positions this
    rank holds, so RoPE follows the chunks (the attention takes the first x.shape[1] rows)."""
    cp, rank = cp_mesh.size(), cp_mesh.get_local_rank()
    cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x, cos, sin = args
        key = (x.shape[1], cos.device)  # a DTensor (SP) reports its cp-local length too
        if key not in cache:
            cache[key] = chunk_positions(x.shape[1] * cp, cp, rank, cos.device)
        rows = cache[key]
        return x, cos[..., rows, :], sin[..., rows, :]  # tables [s, d/2] or [b, s, d/2]

    return hook


def apply_context_parallel(model: Decoder, cp_mesh: DeviceMesh, comm: str) -> None:
    """Make every attention of this (possibly partial) stage attend across the cp group."""
    if comm not in CP_COMM:
        raise ValueError(f"cp_comm must be one of {CP_COMM}, got {comm!r}")
    for block in model.layers.values():
        attention = block.attention  # a Decoder block's attention holds its softmax as `core`
        assert isinstance(attention, nn.Module) and isinstance(attention.core, nn.Module)
        attention.core = (
            AllGatherCausalCore(cp_mesh) if comm == "all_gather" else RingCausalCore(cp_mesh)
        )
        attention.register_forward_pre_hook(_rope_rows_hook(cp_mesh))

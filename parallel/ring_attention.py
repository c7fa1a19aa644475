"""Ring attention over the cp group: K/V blocks travel point-to-point around the ring while each
rank attends to the block it holds, and the partial results are merged by their log-sum-exp
(online softmax). Memory holds two K/V blocks, never the whole sequence's.

Chunks are load-balanced (parallel/context_parallel.py: rank r holds chunks r and 2·cp−1−r),
so with the block of rank s in hand rank r computes: its own block causally (s = r); all its
queries against the first half of the block (s < r); or its second half of queries against the
whole block (s > r) — the same work on every rank at every step.

Written by hand on CPU: torch 2.13's own ring attention is reached only through DTensor
dispatch of SDPA, which has no CPU sharding strategy. Forward and backward call the fused CPU
flash-attention kernels, which return and take the log-sum-exp. On CUDA torch's own ring is used
(`_torch_ring`), with the same head-tail chunk layout; that path is not verified here (no GPU).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.distributed_c10d import GroupName, _resolve_process_group

# the CPU flash-attention kernels SDPA dispatches to, called directly for their log-sum-exp
cpu_flash_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
cpu_flash_attention_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _Ring:
    """The cp group's neighbours: blocks go to rank+1 and come from rank−1."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def shift(self, t: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        """Start sending t to the next rank and receiving the previous rank's; wait on the works."""
        received = torch.empty_like(t)
        ops = [
            dist.P2POp(dist.isend, t, self.next, self.group),
            dist.P2POp(dist.irecv, received, self.prev, self.group),
        ]
        return received, dist.batch_isend_irecv(ops)


def _wait(works: list[Any]) -> None:
    for work in works:
        work.wait()


def chunk_positions(
    seq_len: int, cp: int, rank: int, device: torch.device | None = None
) -> torch.Tensor:
    """The positions cp rank `rank` holds of a seq_len-token sequence cut into 2·cp chunks:
    chunks rank and 2·cp−1−rank, so causal attention costs the same on every rank."""
    c = seq_len // (2 * cp)
    head = torch.arange(rank * c, (rank + 1) * c, device=device)
    tail = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([head, tail])


def held_documents(
    doc_ids: torch.Tensor | None, cp: int, rank: int, device: torch.device
) -> torch.Tensor | None:
    """The document ids [b, s/cp] of the positions cp rank `rank` holds (None: no documents)."""
    if doc_ids is None:
        return None
    return doc_ids[:, chunk_positions(doc_ids.shape[1], cp, rank, device)]


def _cols(ids: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if ids is None else ids[:, part]


def _document_bias(q_ids: torch.Tensor, k_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [b, 1, nq, nk] mask: 0 where query and key are in one document, else -inf
    (the CPU flash kernels want the query's dtype, not a boolean)."""
    apart = q_ids[:, None, :, None] != k_ids[:, None, None, :]
    return torch.zeros(apart.shape, dtype=dtype, device=q_ids.device).masked_fill(
        apart, float("-inf")
    )


def flash_piece(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    q_ids: torch.Tensor | None = None,
    k_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of q over one block of K/V; with the document ids of the query rows and key
    columns [b, n], no query sees a key of another document."""
    if q_ids is None or k_ids is None:
        return cpu_flash_attention(q, k, v, is_causal=causal)[:2]
    out, lse = cpu_flash_attention(
        q, k, v, is_causal=causal, attn_mask=_document_bias(q_ids, k_ids, q.dtype)
    )[:2]
    # a row that sees no key of the block gets out 0 and lse 0 from the kernel: its lse must be
    # -inf for merge_attention to add nothing
    sees = (q_ids[:, :, None] == k_ids[:, None, :]).any(-1)[:, None]
    return out, lse.masked_fill(~sees, float("-inf"))


def flash_piece_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    q_ids: torch.Tensor | None = None,
    k_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of one flash_piece, given the merged out and lse (flash backward's rule)."""
    bias = None if q_ids is None or k_ids is None else _document_bias(q_ids, k_ids, q.dtype)
    grads = cpu_flash_attention_backward(grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=bias)
    return tuple(grads)


def expand_kv(kv: torch.Tensor, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed [b, 2·h_kv, s, d] K/V -> K, V with each K/V head repeated for its query group."""
    k, v = kv.chunk(2, dim=1)
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    return k, v


def fold_kv_grads(dk: torch.Tensor, dv: torch.Tensor, repeats: int) -> torch.Tensor:
    """Gradients of repeated K/V summed back onto the K/V heads, packed like the K/V."""
    if repeats > 1:
        dk, dv = (g.unflatten(1, (-1, repeats)).sum(2) for g in (dk, dv))
    return torch.cat([dk, dv], dim=1).float()


def merge_attention(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-normalized partial attentions by their log-sum-exps (fp32)."""
    new_lse = torch.logaddexp(lse, block_lse)
    out = out * (lse - new_lse).exp().unsqueeze(-1) + block_out.float() * (
        block_lse - new_lse
    ).exp().unsqueeze(-1)
    return out, new_lse


# A custom op, not an autograd.Function: its point-to-point exchanges cannot be traced, and an
# opaque op with a registered backward keeps a compiled block one graph (fullgraph) and is the
# same code eager. The group travels by name (an op's arguments are tensors and plain values).
def ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_name: str,
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the local q over the cp group's K/V, passed around the ring -> (out, lse).

    doc_ids [b, s] (the whole sequence's, on every rank): block-causal, each block's ids are
    looked up by the rank it came from, so none travel."""
    ring = _Ring(_resolve_process_group(GroupName(group_name)))
    repeats, c = q.shape[1] // k.shape[1], q.shape[2] // 2
    q_ids = held_documents(doc_ids, ring.size, ring.rank, q.device)
    kv = torch.cat([k, v], dim=1).contiguous()
    out = lse = torch.empty(0)
    for i in range(ring.size):
        # the next block is on its way while this one is computed
        incoming = ring.shift(kv) if i < ring.size - 1 else None
        source = (ring.rank - i) % ring.size
        kb, vb = expand_kv(kv, repeats)
        k_ids = held_documents(doc_ids, ring.size, source, q.device)
        if i == 0:
            o, lse = flash_piece(q, kb, vb, True, q_ids, k_ids)
            out = o.float()
        elif source < ring.rank:  # every query sees the block's first chunk, none its second
            first = slice(0, c)
            o, block_lse = flash_piece(
                q, kb[:, :, first], vb[:, :, first], False, q_ids, _cols(k_ids, first)
            )
            out, lse = merge_attention(out, lse, o, block_lse)
        else:  # only the local second chunk of queries sees the block, all of it
            o, block_lse = flash_piece(
                q[:, :, c:], kb, vb, False, _cols(q_ids, slice(c, None)), k_ids
            )
            tail, tail_lse = merge_attention(out[:, :, c:], lse[..., c:], o, block_lse)
            out = torch.cat([out[:, :, :c], tail], dim=2)
            lse = torch.cat([lse[..., :c], tail_lse], dim=-1)
        if incoming is not None:
            _wait(incoming[1])
            kv = incoming[0]
    # contiguous, as the fake kernel below says (a compiled graph checks the strides)
    return out.to(q.dtype).contiguous(), lse.contiguous()


def _forward_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_name: str,
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def ring_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    group_name: str,
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ring_attention: dq and the packed [dk, dv], each K/V block's travelling with it."""
    ring = _Ring(_resolve_process_group(GroupName(group_name)))
    grad_out = grad_out.contiguous()
    repeats, c = q.shape[1] // k.shape[1], q.shape[2] // 2
    q_ids = held_documents(doc_ids, ring.size, ring.rank, q.device)
    kv = torch.cat([k, v], dim=1).contiguous()
    dq = torch.zeros_like(q, dtype=torch.float32)
    dkv = torch.zeros_like(kv, dtype=torch.float32)  # travels with its block
    for i in range(ring.size):
        incoming = ring.shift(kv) if i < ring.size - 1 else None
        source = (ring.rank - i) % ring.size
        kb, vb = expand_kv(kv, repeats)
        k_ids = held_documents(doc_ids, ring.size, source, q.device)
        # the merged out and lse make each block's gradient exact (flash backward's rule)
        if i == 0:
            g = flash_piece_backward(grad_out, q, kb, vb, out, lse, True, q_ids, k_ids)
            dq += g[0]
            dkv += fold_kv_grads(g[1], g[2], repeats)
        elif source < ring.rank:
            first = slice(0, c)
            g = flash_piece_backward(
                grad_out,
                q,
                kb[:, :, first],
                vb[:, :, first],
                out,
                lse,
                False,
                q_ids,
                _cols(k_ids, first),
            )
            dq += g[0]
            dkv[:, :, :c] += fold_kv_grads(g[1], g[2], repeats)
        else:
            g = flash_piece_backward(
                grad_out[:, :, c:],
                q[:, :, c:],
                kb,
                vb,
                out[:, :, c:],
                lse[..., c:],
                False,
                _cols(q_ids, slice(c, None)),
                k_ids,
            )
            dq[:, :, c:] += g[0]
            dkv += fold_kv_grads(g[1], g[2], repeats)
        # the block's gradient follows it; after cp shifts it is back with its owner
        dkv, works = ring.shift(dkv)
        _wait(works)
        if incoming is not None:
            _wait(incoming[1])
            kv = incoming[0]
    return dq.to(q.dtype).contiguous(), dkv.to(k.dtype).contiguous()


def _backward_fake(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, *_: Any
) -> tuple[torch.Tensor, ...]:
    return q.new_empty(q.shape), k.new_empty((k.shape[0], 2 * k.shape[1], *k.shape[2:]))


# The ops' bodies are the two functions above (a test runs them itself to count their sends).
ring_attention = torch.library.custom_op("tridist::ring_attention", ring_forward, mutates_args=())
ring_attention_backward = torch.library.custom_op(
    "tridist::ring_attention_backward", ring_backward, mutates_args=()
)
ring_attention.register_fake(_forward_fake)
ring_attention_backward.register_fake(_backward_fake)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    q, k, v, group_name, doc_ids = inputs
    ctx.save_for_backward(q, k, v, *output, doc_ids)  # doc_ids: integers, no gradient
    ctx.group_name = group_name


def _backward(
    ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, lse, doc_ids = ctx.saved_tensors
    dq, dkv = ring_attention_backward(grad_out, q, k, v, out, lse, ctx.group_name, doc_ids)
    dk, dv = dkv.chunk(2, dim=1)
    return dq, dk, dv, None, None


ring_attention.register_autograd(_backward, setup_context=_setup_context)
RING_OP = torch.ops.tridist.ring_attention.default  # as selective recompute's policy sees it


def _torch_ring(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh: DeviceMesh
) -> torch.Tensor:
    """CUDA: torch's own ring attention, through DTensor dispatch of SDPA (not verified here)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.experimental._attention import (
        _cp_options,
        _enable_context_parallel_dispatcher,
        set_rotate_method,
    )

    _cp_options.enable_load_balance = True  # head-tail chunks: the layout shard_sequence makes
    set_rotate_method("alltoall")  # K/V passed block by block (torch's default all-gathers them)
    _enable_context_parallel_dispatcher()  # process-wide: SDPA on DTensors goes to the ring
    repeats = q.shape[1] // k.shape[1]
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    q, k, v = (DTensor.from_local(t, mesh, [Shard(2)], run_check=False) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert isinstance(out, DTensor)
    return out.to_local()


class RingCausalCore(nn.Module):
    """Causal GQA attention over the cp group's sequence, K/V passed around a ring."""

    def __init__(self, cp_mesh: DeviceMesh) -> None:
        super().__init__()
        self.cp_mesh = cp_mesh
        self._group_name = cp_mesh.get_group().group_name

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q [b, h, s/cp, d], k/v [b, h_kv, s/cp, d] (this rank's chunks) -> [b, h, s/cp, d];
        doc_ids [b, s]: the whole sequence's document ids (block-causal)."""
        if q.is_cuda:
            if doc_ids is not None:  # launcher/validate.py refuses this before start
                raise NotImplementedError("document masks with cp_comm=ring run on CPU only")
            return _torch_ring(q, k, v, self.cp_mesh)
        return ring_attention(q, k, v, self._group_name, doc_ids)[0]

"""Context parallelism over the `cp` mesh dim: every sequence is split across the cp ranks in
load-balanced chunks, and attention sees the whole sequence by all-gathering K/V (the Llama 3
paper's choice, cheap with GQA) or by passing K/V blocks around a ring (parallel/ring_attention.py).

Applied from outside the model, as TP is: each block's parameter-free `attention.core` is
swapped for one that attends over the cp group, and a forward pre-hook hands the attention the
RoPE rows of the positions this rank holds. Everything else in a block is per-token and runs on
the local chunks unchanged.

Written by hand: torch's `context_parallel()` does not train on CPU in torch 2.13 (no sharding
strategy for the CPU flash-attention op, MATH fails on mixed Tensor/DTensor, flex attention has
no CPU backward). On CUDA the ring uses torch's own ring attention (see ring_attention.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_gather_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from models.llama import Attention, Transformer
from parallel.ring_attention import RingCausalCore

CP_COMM = ("all_gather", "ring")


def chunk_positions(
    seq_len: int, cp: int, rank: int, device: torch.device | None = None
) -> torch.Tensor:
    """The positions cp rank `rank` holds of a seq_len-token sequence cut into 2·cp chunks:
    chunks rank and 2·cp−1−rank, so causal attention costs the same on every rank."""
    c = seq_len // (2 * cp)
    head = torch.arange(rank * c, (rank + 1) * c, device=device)
    tail = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([head, tail])


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


class AllGatherCausalCore(nn.Module):
    """Causal GQA attention of the local queries over the whole sequence's K/V, all-gathered
    across cp (un-repeated: traffic scales with the K/V heads). Each local query chunk attends
    to the keys up to its own end only, so every rank does the same work."""

    def __init__(self, cp_mesh: DeviceMesh) -> None:
        super().__init__()
        self.cp_mesh = cp_mesh
        self._masks: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def _mask(self, c: int, chunk: int, device: torch.device) -> torch.Tensor:
        """Bottom-right causal mask of query chunk `chunk` over keys [0, (chunk+1)·c)."""
        key = (c, chunk, device)
        if key not in self._masks:
            ones = torch.ones(c, (chunk + 1) * c, dtype=torch.bool, device=device)
            self._masks[key] = ones.tril(diagonal=chunk * c)
        return self._masks[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [b, h, s/cp, d], k/v [b, h_kv, s/cp, d] (this rank's chunks) -> [b, h, s/cp, d]."""
        cp, rank = self.cp_mesh.size(), self.cp_mesh.get_local_rank()
        # the one collective: K and V of every cp rank, sequence first (the gathered dim), in
        # rank order; backward reduce-scatters their gradients back
        kv = torch.cat([k, v], 1).movedim(2, 0).contiguous()
        pieces = all_gather_single_autograd(kv, 0, self.cp_mesh).movedim(0, 2).chunk(2 * cp, 2)
        k_all, v_all = torch.cat([pieces[i] for i in gathered_order(cp)], 2).chunk(2, dim=1)
        repeats = q.shape[1] // k_all.shape[1]
        if repeats > 1:
            k_all = k_all.repeat_interleave(repeats, dim=1)
            v_all = v_all.repeat_interleave(repeats, dim=1)
        c = q.shape[2] // 2
        outs = []
        for q_chunk, chunk in zip(q.chunk(2, dim=2), (rank, 2 * cp - 1 - rank)):
            end = (chunk + 1) * c
            keys, values = k_all[:, :, :end], v_all[:, :, :end]
            if chunk == 0:  # square: the plain causal mask
                outs.append(F.scaled_dot_product_attention(q_chunk, keys, values, is_causal=True))
            else:
                mask = self._mask(c, chunk, q.device)
                outs.append(F.scaled_dot_product_attention(q_chunk, keys, values, attn_mask=mask))
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
        return x, cos[rows], sin[rows]

    return hook


def apply_context_parallel(model: Transformer, cp_mesh: DeviceMesh, comm: str) -> None:
    """Make every attention of this (possibly partial) stage attend across the cp group."""
    if comm not in CP_COMM:
        raise ValueError(f"cp_comm must be one of {CP_COMM}, got {comm!r}")
    for block in model.layers.values():
        attention = block.attention
        assert isinstance(attention, Attention)
        attention.core = (
            AllGatherCausalCore(cp_mesh) if comm == "all_gather" else RingCausalCore(cp_mesh)
        )
        attention.register_forward_pre_hook(_rope_rows_hook(cp_mesh))

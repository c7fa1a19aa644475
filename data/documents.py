"""Documents inside packed sequences: boundaries derived from the end-of-document (EOS) tokens of
the inputs, as Megatron's `get_ltor_masks_and_position_ids` derives them (an EOS belongs to the
document it ends). Vectorised over the batch: no Python loop over tokens, no host sync."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a target the loss skips (F.cross_entropy's default ignore_index)


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per token of [b, s] ids, the number of EOS tokens strictly before it in its row (int64)."""
    is_eos = (tokens == eos_id).long()
    return is_eos.cumsum(1) - is_eos


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Per token, its position inside its own document (RoPE positions restarting per document)."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values
    return index - first


def document_inputs(
    tokens: torch.Tensor, eos_id: int, *, mask: bool, reset_positions: bool
) -> dict[str, torch.Tensor]:
    """The model's keyword inputs for a batch: `doc_ids` (block-causal attention) and/or
    `positions` (per-document RoPE), each [b, s] for the whole sequence; empty when neither."""
    if not (mask or reset_positions):
        return {}
    ids = document_ids(tokens, eos_id)
    out = {"doc_ids": ids} if mask else {}
    if reset_positions:
        out["positions"] = document_positions(ids)
    return out


def mask_document_ends(inputs: torch.Tensor, targets: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Targets with IGNORE_INDEX where the input is an EOS: the jump into the next document is
    not predicted (Megatron's eod_mask_loss)."""
    return torch.where(inputs == eos_id, torch.full_like(targets, IGNORE_INDEX), targets)

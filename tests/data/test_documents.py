"""Document ids, per-document positions and the masked EOS targets of packed sequences."""

import torch

from data.documents import (
    IGNORE_INDEX,
    document_ids,
    document_inputs,
    document_positions,
    mask_document_ends,
)

EOS = 0
TOKENS = torch.tensor([[5, 6, 0, 7, 0, 0, 8, 9], [0, 1, 2, 3, 4, 5, 6, 7]])


def test_ids_and_positions_follow_megatron() -> None:
    # an EOS belongs to the document it ends; two EOS in a row make a one-token document
    ids = document_ids(TOKENS, EOS)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    positions = document_positions(ids)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert document_inputs(TOKENS, EOS, mask=False, reset_positions=False) == {}
    both = document_inputs(TOKENS, EOS, mask=True, reset_positions=True)
    assert torch.equal(both["doc_ids"], ids) and torch.equal(both["positions"], positions)
    assert document_inputs(TOKENS, EOS, mask=False, reset_positions=True).keys() == {"positions"}


def test_eos_targets_are_masked() -> None:
    targets = torch.roll(TOKENS, -1, 1)
    masked = mask_document_ends(TOKENS, targets, EOS)
    assert torch.equal(masked == IGNORE_INDEX, TOKENS == EOS)
    assert torch.equal(masked[TOKENS != EOS], targets[TOKENS != EOS])

"""DistributedBatchSampler: seeded order, dp slicing, exact resume and re-splitting."""

import pytest
import torch

from data import DistributedBatchSampler, validation_batches

TOKENS = torch.arange(1001, dtype=torch.int32) % 256  # 1000 // 8 = 125 windows of 9 tokens
SEQ, GLOBAL = 8, 8


def _sampler(dp_rank: int = 0, dp_size: int = 1, seed: int = 0) -> DistributedBatchSampler:
    return DistributedBatchSampler(TOKENS, SEQ, GLOBAL, dp_rank, dp_size, seed)


def _global_batch(samplers: list[DistributedBatchSampler]) -> torch.Tensor:
    """Concatenate one step of every dp rank's inputs, in rank order."""
    return torch.cat([s.next_batch()[0] for s in samplers])


def test_batches_are_shifted_int64_windows_and_seeded() -> None:
    inputs, targets = _sampler().next_batch()
    assert inputs.shape == targets.shape == (GLOBAL, SEQ) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.all(inputs[:, 0] % SEQ == 0)  # each row starts on a window boundary
    assert torch.equal(_sampler(seed=1).next_batch()[0], _sampler(seed=1).next_batch()[0])
    assert not torch.equal(_sampler(seed=1).next_batch()[0], _sampler(seed=2).next_batch()[0])


def test_dp_ranks_concatenate_to_the_dp1_batch() -> None:
    single, pair = _sampler(), [_sampler(r, 2) for r in range(2)]
    for _ in range(3):
        assert torch.equal(_global_batch(pair), _global_batch([single]))


def test_resume_and_resplit_continue_the_same_global_sequence() -> None:
    reference = _sampler()
    expected = [_global_batch([reference]) for _ in range(5)]
    pair = [_sampler(r, 2) for r in range(2)]
    for _ in range(3):
        _global_batch(pair)
    state = pair[0].state_dict()
    assert state == pair[1].state_dict()  # rank-independent, so any rank's copy will do
    for dp_size in (1, 2, 4):
        resumed = [_sampler(r, dp_size) for r in range(dp_size)]
        for s in resumed:
            s.load_state_dict(state)
        assert torch.equal(_global_batch(resumed), expected[3])
        assert torch.equal(_global_batch(resumed), expected[4])


def test_epochs_wrap_with_a_fresh_permutation() -> None:
    sampler = DistributedBatchSampler(TOKENS, SEQ, 25, 0, 1, seed=3)
    epoch0 = torch.cat([sampler.next_batch()[0][:, 0] for _ in range(5)])  # 125 = 5 * 25
    epoch1 = torch.cat([sampler.next_batch()[0][:, 0] for _ in range(5)])
    all_starts = torch.arange(0, 1000, SEQ, dtype=torch.int64) % 256
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == sorted(all_starts.tolist())
    assert not torch.equal(epoch0, epoch1)


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="multiple of dp_size"):
        DistributedBatchSampler(TOKENS, SEQ, 6, 0, 4, 0)
    with pytest.raises(ValueError, match="seq_len"):
        DistributedBatchSampler(TOKENS[:8], SEQ, 2, 0, 1, 0)
    with pytest.raises(ValueError, match="changed"):
        other = DistributedBatchSampler(TOKENS[:500], SEQ, GLOBAL, 0, 1, 0)
        other.load_state_dict(_sampler().state_dict())


def test_validation_batches_are_the_first_windows_in_order() -> None:
    batches = validation_batches(TOKENS, SEQ, 4, 2)
    assert len(batches) == 2
    starts = torch.cat([inputs[:, 0] for inputs, _ in batches])
    assert starts.tolist() == [0, 8, 16, 24, 32, 40, 48, 56]
    assert len(validation_batches(TOKENS, SEQ, 100, 5)) == 1  # only one full batch fits


def test_validation_batches_split_over_dp_cover_the_single_process_batches() -> None:
    whole = validation_batches(TOKENS, SEQ, 4, 2)
    halves = [validation_batches(TOKENS, SEQ, 4, 2, rank, 2) for rank in range(2)]
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][b][0], halves[1][b][0]]), x)
        assert torch.equal(torch.cat([halves[0][b][1], halves[1][b][1]]), y)

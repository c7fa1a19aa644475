"""Seeded, resumable, data-parallel batches of fixed-length windows over a token stream.

Window i is tokens[i*seq_len : i*seq_len + seq_len + 1]; inputs are its first seq_len
tokens and targets its last seq_len. Global sample g reads window perm_e[g % n_windows],
with epoch e = g // n_windows and perm_e = randperm(n_windows) seeded by seed + e. Each
step consumes global_batch_size consecutive samples and dp rank r takes the r-th contiguous
slice, so the only state is the global sample counter and a checkpoint taken at one dp size
resumes the same global sequence at any other.

A source of packed rows (data/packing.py's BlendedSamples) replaces the windows: global sample g
is then its row g, with the same counter, slicing and state.
"""

from collections.abc import Sequence
from typing import Protocol

import torch


class SampleRows(Protocol):
    """Rows of seq_len + 1 tokens addressed by global sample id (a packed, blended corpus)."""

    n_samples: int  # samples per pass over the data: the resume check and validation's count

    def rows(self, samples: Sequence[int], seed: int) -> torch.Tensor:
        """int64 [len(samples), seq_len + 1]."""
        ...

    def __len__(self) -> int:
        """Tokens held."""
        ...

    def __getitem__(self, index: slice) -> torch.Tensor:
        """A slice of the first row's tokens."""
        ...


def _split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Contiguous copies: overlapping views of one buffer would break .view() in the model.
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _window_count(tokens: torch.Tensor, seq_len: int) -> int:
    """How many non-overlapping (seq_len + 1)-token windows the stream holds, checked > 0."""
    if tokens.dim() != 1:
        raise ValueError(f"token stream must be 1-D, got shape {tuple(tokens.shape)}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows <= 0:
        raise ValueError(
            f"token stream has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
    return n_windows


def _stack_windows(
    tokens: torch.Tensor, windows: list[int], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 tensors for the given window indices, one row each."""
    # Widen per window so the stream itself stays in its compact dtype (uint8/16/32).
    rows = torch.stack(
        [tokens[w * seq_len : w * seq_len + seq_len + 1].to(torch.int64) for w in windows]
    )
    return _split_rows(rows)


class DistributedBatchSampler:
    """Yields this dp rank's share of each global batch, in a seeded order that survives resume."""

    def __init__(
        self,
        tokens: torch.Tensor | SampleRows,
        seq_len: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ) -> None:
        """Check sizes and start at global sample 0."""
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in range for dp_size {dp_size}")
        if global_batch_size <= 0 or global_batch_size % dp_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of "
                f"dp_size {dp_size}; pick e.g. {max(1, global_batch_size // dp_size) * dp_size}"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.n_windows = (
            _window_count(tokens, seq_len) if isinstance(tokens, torch.Tensor) else tokens.n_samples
        )
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.samples_consumed = 0
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def _window_of(self, sample: int) -> int:
        """The window index global sample `sample` reads, via its epoch's permutation."""
        epoch, position = divmod(sample, self.n_windows)
        if epoch != self._perm_epoch:  # one permutation cached: samples only move forward
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.n_windows, generator=generator)
            self._perm_epoch = epoch
        return int(self._perm[position])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets), each int64 [global_batch_size // dp_size, seq_len]."""
        start = self.samples_consumed + self.dp_rank * self.local_batch_size
        self.samples_consumed += self.global_batch_size
        ids = range(start, start + self.local_batch_size)
        if not isinstance(self.tokens, torch.Tensor):
            return _split_rows(self.tokens.rows(ids, self.seed))
        return _stack_windows(self.tokens, [self._window_of(g) for g in ids], self.seq_len)

    def state_dict(self) -> dict[str, int]:
        """The global position; independent of dp_rank and dp_size, so it can be re-split."""
        return {
            "samples_consumed": self.samples_consumed,
            "seed": self.seed,
            "n_windows": self.n_windows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved global position; the saved seed wins so the order continues."""
        saved_windows = state.get("n_windows", self.n_windows)
        if saved_windows != self.n_windows:
            raise ValueError(
                f"checkpoint's sampler saw {saved_windows} windows but this stream has "
                f"{self.n_windows}; the data or seq_len changed, so the order cannot resume"
            )
        self.samples_consumed = int(state["samples_consumed"])
        self.seed = int(state.get("seed", self.seed))
        self._perm_epoch = -1  # the seed may have changed, so drop the cached permutation


def validation_batches(
    tokens: torch.Tensor | SampleRows,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This dp rank's rows of the first `n_batches` global batches of `batch_size` windows, in
    order: the ranks together evaluate exactly what one process would, whatever dp is."""
    if batch_size <= 0 or n_batches <= 0:
        raise ValueError(
            f"batch_size and n_batches must be positive, got {batch_size}, {n_batches}"
        )
    if dp_size <= 0 or batch_size % dp_size or not 0 <= dp_rank < dp_size:
        raise ValueError(
            f"batch_size {batch_size} must split evenly over dp_size {dp_size} (rank {dp_rank})"
        )
    windows = (
        _window_count(tokens, seq_len) if isinstance(tokens, torch.Tensor) else tokens.n_samples
    )
    available = windows // batch_size
    if available == 0:
        raise ValueError(
            f"validation stream of {len(tokens)} tokens cannot fill one batch of "
            f"{batch_size} x {seq_len + 1} tokens; lower batch_size or raise val_fraction"
        )
    local = batch_size // dp_size
    if not isinstance(tokens, torch.Tensor):
        return [
            _split_rows(
                tokens.rows(
                    range(b * batch_size + dp_rank * local, b * batch_size + (dp_rank + 1) * local),
                    0,
                )
            )
            for b in range(min(n_batches, available))
        ]
    return [
        _stack_windows(
            tokens,
            list(range(b * batch_size + dp_rank * local, b * batch_size + (dp_rank + 1) * local)),
            seq_len,
        )
        for b in range(min(n_batches, available))
    ]

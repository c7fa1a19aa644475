"""Fixed-length samples packed from the documents of indexed datasets, blended by weight.

Per source (Megatron's GPTDataset, without its sample shuffle): the split's documents are
shuffled once per epoch (seeded by seed, source and epoch), concatenated with the EOS tokens
preprocessing appended, and sample j of the epoch is tokens [j*L, j*L + L + 1) of that stream
(L = seq_len; the extra token is the last target), so an epoch holds (tokens - 1) // L samples.
EOS tokens stay in the samples: document boundaries can be derived from the inputs. Memory is
O(documents) small ints per source (lengths, one epoch's order and its offsets); tokens are
read from the `.bin` (pread, not mapped) only for the rows asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from data.blend import BlendIndex
from data.indexed_dataset import IndexedDataset


class PackedDocuments:
    """Samples of seq_len + 1 tokens over one split (a document range) of one indexed dataset."""

    def __init__(
        self, dataset: IndexedDataset, first: int, stop: int, seq_len: int, key: int, shuffle: bool
    ) -> None:
        """Documents first..stop-1 of `dataset`; `key` tells sources apart in the shuffle seed."""
        starts, lengths = dataset.document_token_ranges()
        self.dataset, self.first, self.seq_len, self.key, self.shuffle = (
            dataset,
            first,
            seq_len,
            key,
            shuffle,
        )
        self.starts = starts[first:stop].copy()  # file offsets: rows never touch the index
        self.lengths = lengths[first:stop].astype(np.int32)
        del starts, lengths
        self.n_tokens = int(self.lengths.sum(dtype=np.int64))
        self.n_samples = max(0, (self.n_tokens - 1) // seq_len)
        self._epoch_key: tuple[int, int] | None = None
        self._order = np.empty(0, dtype=np.int32)
        self._ends = np.empty(0, dtype=np.int64)

    def _epoch(self, seed: int, epoch: int) -> None:
        if self._epoch_key == (seed, epoch):
            return  # one epoch cached: a source's samples only move forward
        n = len(self.lengths)
        if self.shuffle:
            rng = np.random.default_rng([seed, self.key, epoch])
            self._order = rng.permutation(n).astype(np.int32)
        else:
            self._order = np.arange(n, dtype=np.int32)
        self._ends = np.cumsum(self.lengths[self._order], dtype=np.int64)
        self._epoch_key = (seed, epoch)

    def row(self, j: int, seed: int) -> np.ndarray:
        """Sample j (any epoch) as seq_len + 1 int64 tokens."""
        epoch, position = divmod(j, self.n_samples)
        self._epoch(seed, epoch)
        offset, need = position * self.seq_len, self.seq_len + 1
        pieces: list[np.ndarray] = []
        doc = int(np.searchsorted(self._ends, offset, side="right"))
        while need > 0:
            order = int(self._order[doc])
            end = int(self._ends[doc])
            begin = end - int(self.lengths[order])
            take = min(need, end - offset)
            start = int(self.starts[order]) + offset - begin
            pieces.append(self.dataset.read(start, take))
            need, offset, doc = need - take, offset + take, doc + 1
        return np.concatenate(pieces).astype(np.int64)


class BlendedSamples:
    """One split of a weighted blend: global sample g -> a packed row of its source."""

    def __init__(self, sources: list[PackedDocuments], weights: list[float]) -> None:
        """Sources and their normalised weights (each source must hold at least one sample)."""
        self.sources, self.weights = sources, weights
        self.seq_len = sources[0].seq_len
        self.index = BlendIndex(weights)
        # one "epoch" of the blend, for the resume check and for validation's batch count
        self.n_samples = sum(s.n_samples for s in sources)

    def __len__(self) -> int:
        """Tokens in this split, over all sources (the banner's count)."""
        return sum(s.n_tokens for s in self.sources)

    def source_samples(self, samples: Sequence[int]) -> list[tuple[int, int]]:
        """(source, source sample) of each global sample: what the blend reads for it."""
        return [self.index.lookup(g) for g in samples]

    def rows(self, samples: Sequence[int], seed: int) -> torch.Tensor:
        """int64 [len(samples), seq_len + 1]: the packed rows of these global samples."""
        picked = self.source_samples(samples)
        return torch.from_numpy(np.stack([self.sources[k].row(j, seed) for k, j in picked]))

    def __getitem__(self, index: slice) -> torch.Tensor:
        """Tokens of the first sample (unshuffled order), sliced: a prompt for id-only sources."""
        return torch.from_numpy(self.sources[0].row(0, seed=0))[index]

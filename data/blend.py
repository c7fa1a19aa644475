"""Weighted blends of sources with Megatron's semantics: `[w1, prefix1, w2, prefix2, ...]` or
`[prefix1, prefix2, ...]` (equal weights), weights normalised, and the greedy blend index.

Megatron's `build_blending_indices`: global sample i goes to the source with the largest
`w * max(i, 1) - drawn` (the first on ties) and is that source's `drawn`-th sample. The index is
built here lazily, a chunk at a time, with the running counts saved at each chunk start, so
memory is O(chunk) whatever the run length and any sample is reached from its chunk's start.
"""

from __future__ import annotations

import math

import numpy as np

CHUNK = 4096  # samples per lazily built piece of the blend index


def parse_blend(paths: list[object]) -> tuple[list[float], list[str]]:
    """(normalised weights, prefixes) of Megatron's data path list; ValueError if malformed."""
    if not paths:
        raise ValueError("give at least one prefix")
    if len(paths) % 2 == 0 and all(_is_number(w) for w in paths[::2]):
        weights = [float(w) for w in paths[::2]]  # type: ignore[arg-type]
        prefixes = [str(p) for p in paths[1::2]]
    else:
        weights, prefixes = [1.0] * len(paths), [str(p) for p in paths]
    if any(_is_number(p) for p in prefixes):
        raise ValueError("use [weight, prefix, weight, prefix, ...] or [prefix, prefix, ...]")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError("weights must be finite, >= 0 and sum to more than 0")
    total = sum(weights)
    return [w / total for w in weights], prefixes


def _is_number(value: object) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def greedy_blend(
    weights: list[float], start: int, count: int, drawn: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(source, source sample) of global samples start..start+count-1, given each source's
    samples drawn before `start`; `drawn` is advanced in place (Megatron's greedy rule)."""
    sources = np.empty(count, dtype=np.int16)
    local = np.empty(count, dtype=np.int64)
    for n in range(count):
        scale = float(max(start + n, 1))
        best, best_error = 0, weights[0] * scale - drawn[0]
        for k in range(1, len(weights)):
            error = weights[k] * scale - drawn[k]
            if error > best_error:
                best, best_error = k, error
        sources[n], local[n] = best, drawn[best]
        drawn[best] += 1
    return sources, local


class BlendIndex:
    """Global sample -> (source, that source's sample), built lazily chunk by chunk."""

    def __init__(self, weights: list[float]) -> None:
        """Normalised weights, one per source."""
        self.weights = weights
        self._starts: list[list[int]] = [[0] * len(weights)]  # drawn counts at each chunk start
        self._chunk = -1
        self._cached: tuple[np.ndarray, np.ndarray] = (np.empty(0), np.empty(0))

    def _load(self, chunk: int) -> None:
        while len(self._starts) <= chunk:  # extend the saved counts up to this chunk
            drawn = list(self._starts[-1])
            greedy_blend(self.weights, (len(self._starts) - 1) * CHUNK, CHUNK, drawn)
            self._starts.append(drawn)
        drawn = list(self._starts[chunk])
        self._cached = greedy_blend(self.weights, chunk * CHUNK, CHUNK, drawn)
        if len(self._starts) == chunk + 1:
            self._starts.append(drawn)  # the next chunk's start, for free
        self._chunk = chunk

    def lookup(self, sample: int) -> tuple[int, int]:
        """(source, source sample) of global sample `sample`."""
        chunk, position = divmod(sample, CHUNK)
        if chunk != self._chunk:
            self._load(chunk)
        return int(self._cached[0][position]), int(self._cached[1][position])

"""Measure the activation memory autograd keeps for backward, as it happens."""

from __future__ import annotations

import torch


class _Saved:
    """One tensor autograd saved; its bytes count as live until autograd drops it."""

    __slots__ = ("tensor", "nbytes", "tracker")

    def __init__(self, tensor: torch.Tensor, tracker: SavedActivationTracker) -> None:
        self.tensor, self.tracker = tensor, tracker
        self.nbytes = tensor.numel() * tensor.element_size()
        tracker.live += self.nbytes
        tracker.total += self.nbytes
        tracker.peak = max(tracker.peak, tracker.live)

    def __del__(self) -> None:
        self.tracker.live -= self.nbytes


class SavedActivationTracker:
    """Within `with tracker:`, counts bytes saved for backward: live now, peak, and total packed.

    peak / (total / microbatches) is the number of microbatches whose activations a stage held
    at once, which is what distinguishes 1F1B from GPipe.
    """

    def __init__(self) -> None:
        self.live = self.peak = self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda t: _Saved(t, self), lambda s: s.tensor
        )

    def __enter__(self) -> SavedActivationTracker:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

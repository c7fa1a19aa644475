"""Measure the activation memory autograd keeps for backward, as it happens."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


class _Saved:
    """One tensor autograd saved; its bytes count as live until autograd drops it."""

    __slots__ = ("tensor", "nbytes", "tracker")

    def __init__(self, tensor: torch.Tensor, tracker: SavedActivationTracker) -> None:
        # detached, as torch's saved_tensors_hooks requires: a tensor autograd saves from its own
        # node's output carries that node as grad_fn, and holding it would make a node -> this ->
        # tensor -> node cycle that no backward releases (an input-gradient pass runs with
        # retain_graph=True, so nodes the weight-gradient pass skips would be counted forever)
        self.tensor, self.tracker = tensor.detach(), tracker
        self.nbytes = tensor.numel() * tensor.element_size()
        tracker.live += self.nbytes
        tracker.total += self.nbytes
        tracker.peak = max(tracker.peak, tracker.live)

    def __del__(self) -> None:
        self.tracker.live -= self.nbytes


class SavedActivationTracker:
    """Within `with tracker:`, counts bytes saved for backward: live now, peak, and total packed.

    peak / (total / microbatches) is the number of microbatches whose activations a stage held
    at once, which is what distinguishes 1F1B from GPipe; with the model's `parameters` given,
    the weights autograd saves are left out of both.
    """

    def __init__(self, parameters: Iterable[torch.Tensor] = ()) -> None:
        self.live = self.peak = self.total = 0
        # weights autograd saves (a matmul's) are not activations, and leaves: no cycle to break
        self._weights = {
            (p.to_local() if isinstance(p, DTensor) else p).untyped_storage().data_ptr()
            for p in parameters
        }
        self._hooks = torch.autograd.graph.saved_tensors_hooks(
            self._pack, lambda s: s if isinstance(s, torch.Tensor) else s.tensor
        )

    def _pack(self, t: torch.Tensor) -> torch.Tensor | _Saved:
        # a DTensor is a wrapper without storage of its own: never one of the local weights
        if self._weights and not isinstance(t, DTensor):
            if t.untyped_storage().data_ptr() in self._weights:
                return t
        return _Saved(t, self)

    def __enter__(self) -> SavedActivationTracker:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

"""Regional compilation: each transformer block's forward through torch.compile (TorchTitan's
per-block compile), so one compiled graph serves every identical block.

Applied after TP/SP and activation checkpointing and before FSDP2/replicate: the block's own
hooks (recompute, FSDP2's all-gather and reshard) stay outside the compiled region, as with
TorchTitan's wrapped blocks. The forward is compiled in place rather than wrapping the block in
an OptimizedModule, so parameter names (and checkpoints) are the same compiled or not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.decoder import Decoder


def _compiled(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    # fullgraph: a graph break inside a block is a bug to see, not a silent slowdown
    compiled = torch.compile(forward, fullgraph=True)

    def run(x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        # Written by hand around a torch 2.13 bug: a compiled graph whose input is a view made by
        # DTensor.to_local() (the TP embedding's output) returns no gradient for it, so the
        # embedding would never learn. A copy (one activation, first block only) is not a view.
        if x._is_view():
            x = x.clone()
        return compiled(x, *args)

    run._tridist_compiled = True  # type: ignore[attr-defined]
    return run


def apply_compile(model: Decoder) -> None:
    """Replace each block's forward by its torch.compile'd version (Inductor: C++ on CPU)."""
    for block in model.layers.values():
        block.forward = _compiled(block.forward)


def is_compiled(model: torch.nn.Module) -> bool:
    """True if some block of `model` runs a compiled forward (apply_compile was applied)."""
    return any(
        getattr(m.__dict__.get("forward"), "_tridist_compiled", False) for m in model.modules()
    )

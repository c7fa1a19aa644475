"""A model family as data: what parallel/, the planner and the checkpoint code read about it.

TorchTitan's model registry is the model: each family (models/<family>/) exports one ModelSpec
as `SPEC`, and nothing outside models/ names a family's classes. The TP plan is data here
(models/ never imports torch.distributed): module path pattern -> one of TP_STYLES, which
parallel/tensor_parallel.py turns into torch's ParallelStyles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from models.args import ModelArgs
from models.decoder import Decoder
from models.hf import HFLayout

# the TP plan's vocabulary (parallel/tensor_parallel.py maps each to a torch ParallelStyle):
TP_STYLES = {
    "embedding": "vocabulary rows split (RowwiseParallel of a replicated id input)",
    "colwise": "output features split (ColwiseParallel): q/k/v, gate and up projections",
    "rowwise": "input features split (RowwiseParallel), partial sums reduced after it",
    "head": "output head split by vocabulary, logits left sharded for the parallel loss",
    "per_head_norm": "a norm over head_dim of tp-split heads: weight replicated, its gradient "
    "summed over tp (SequenceParallel on the heads dim)",
}
# under sequence parallelism only:
SP_STYLES = {
    "sequence_norm": "a norm of the residual stream, run on this rank's sequence slice",
    "gather_sequence": "a module whose first input is all-gathered from sequence slices",
}

InitialValue = Callable[[str, torch.Size, ModelArgs, torch.Generator], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One family: how to build, initialize, shard, count and map its model."""

    family: str  # the value of model.family
    build: Callable[[ModelArgs], Decoder]  # the whole model (on the current device, or meta)
    initial_value: InitialValue  # full value of a parameter by name: the same for any layout
    parameter_count: Callable[[ModelArgs], int]  # the whole model's, by arithmetic
    # the parameters one token goes through (MoE: its k experts only); None: all of them
    active_parameter_count: Callable[[ModelArgs], int] | None = None
    tp_plan: Mapping[str, str]  # module path pattern -> a TP_STYLES name
    sp_plan: Mapping[str, str]  # added under sequence parallelism -> a SP_STYLES name
    hf: HFLayout  # names, rotary permutation and config.json of the Hugging Face model
    block_feed_forward: str = "dense"  # the blocks' feed-forward kind (a routed MoE: "moe")
    expert_parameters: tuple[str, ...] = ()  # patterns of expert weights (for expert parallelism)

    def __post_init__(self) -> None:
        unknown = {s for s in self.tp_plan.values() if s not in TP_STYLES} | {
            s for s in self.sp_plan.values() if s not in SP_STYLES
        }
        if unknown:
            raise ValueError(f"model family {self.family}: unknown TP styles {sorted(unknown)}")

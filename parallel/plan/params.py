"""Exact parameter counts per pipeline stage, from the real split and the real TP plan on meta.

Nothing here is a formula: each kind of stage (so many blocks, with or without the embedding
and the head) is cut by the real `build_stage_module` from a meta-device model (its family's spec), sharded
by the real `apply_tensor_parallel` on a device mesh with no process group behind it, and its
local DTensor shards are counted. The counts follow the model, the split and the TP plan
wherever they go; the one assumption is that all blocks have the same shapes. A Mixture-of-
Experts family's routed experts (its spec's `expert_parameters`) and the parts of its MoE
feed-forwards that TP leaves whole on every rank are counted apart: expert parallelism splits
the first, and each TP rank repeats the work of the second.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from dataclasses import dataclass, fields, replace

import torch
from torch.distributed.device_mesh import DeviceMesh

from models.args import ModelArgs
from models.decoder import Decoder
from models.moe import moe_modules
from models.registry import model_spec
from parallel.pipeline.runtime import build_stage_module
from parallel.tensor_parallel import apply_tensor_parallel, matches


@dataclass(frozen=True)
class StageParams:
    """The parameters one TP rank holds for one pipeline stage (chunk)."""

    total: int  # elements on TP rank 0 (torch chunks unevenly with rank 0 largest)
    embedding: int  # of which the token embedding: a lookup, no matmul FLOPs
    layers: int  # transformer blocks in the stage
    largest_block: int  # elements of its largest block (FSDP's unsharded working set)
    shapes: tuple[tuple[int, int, int], ...]  # (dim 0, elements per dim-0 row, how many)
    # Mixture-of-Experts (0 and () for a dense model):
    experts: int = 0  # of total, the routed experts' weights (the spec's expert_parameters)
    block_experts: int = 0  # of largest_block, its routed experts
    expert_shapes: tuple[tuple[int, int, int], ...] = ()  # of shapes, the routed experts'
    # elements of the MoE feed-forwards that TP leaves whole on every TP rank, so that each
    # TP rank repeats their work: routed experts, and the rest (router, shared expert)
    replicated_experts: int = 0
    replicated_moe: int = 0

    def sharded(self, dp: int, *, experts: bool = True) -> int:
        """Elements on one dp rank when FSDP2 shards every parameter on dim 0 (ceil, padded);
        `experts=False` leaves the routed experts out (expert parallelism splits them instead)."""
        full = sum(math.ceil(d0 / dp) * row * n for d0, row, n in self.shapes)
        if experts:
            return full
        return full - sum(math.ceil(d0 / dp) * row * n for d0, row, n in self.expert_shapes)

    def experts_held(self, ep: int) -> int:
        """Routed-expert elements on one GPU when expert parallelism splits the experts (dim 0
        of the stacked weights) over `ep` GPUs."""
        return sum(math.ceil(d0 / ep) * row * n for d0, row, n in self.expert_shapes)

    def active(self, expert_share: float) -> float:
        """Elements one token goes through: all but the routed experts it is not sent to
        (`expert_share` of them it is: active_expert_share)."""
        return self.total - (1 - expert_share) * self.experts


def tp_mesh_without_process_group(tp: int) -> DeviceMesh:
    """A 1-D "tp" mesh seen from rank 0 that never starts a backend (nothing is communicated)."""
    # _init_backend/_rank are private DeviceMesh arguments: DTensor needs only the coordinate
    # to shard meta tensors, and no process group may start in the planner
    return DeviceMesh("cpu", torch.arange(tp), mesh_dim_names=("tp",), _init_backend=False, _rank=0)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _sharded_by_tp(p: torch.Tensor) -> bool:
    return any(pl.is_shard() for pl in getattr(p, "placements", ()))


def _shape_key(local: torch.Tensor) -> tuple[int, int]:
    d0 = local.shape[0] if local.dim() else 1
    return d0, local.numel() // max(d0, 1)


def _tally(keys: list[tuple[int, int]]) -> tuple[tuple[int, int, int], ...]:
    counted: dict[tuple[int, int], int] = {}
    for key in keys:
        counted[key] = counted.get(key, 0) + 1
    return tuple((d0, row, n) for (d0, row), n in sorted(counted.items()))


def count_stage(stage: Decoder, expert_patterns: tuple[str, ...] = ()) -> StageParams:
    """Count the (possibly TP-sharded) parameters of one built stage module; those whose names
    match `expert_patterns` (a spec's expert_parameters) are also counted as routed experts."""
    named = [(name, _local(p)) for name, p in stage.named_parameters()]
    is_expert = {name: any(matches(pat, name) for pat in expert_patterns) for name, _ in named}
    experts = [local for name, local in named if is_expert[name]]
    # the MoE feed-forwards' parameters TP left whole (plain tensors, or replicated DTensors)
    moes = {id(m) for m in moe_modules(stage)}
    whole = [
        (is_expert[name], _local(p).numel())
        for prefix, module in stage.named_modules()
        if id(module) in moes
        for name, p in module.named_parameters(prefix=prefix)
        if not _sharded_by_tp(p)
    ]
    blocks = [
        (
            sum(_local(p).numel() for p in b.parameters()),
            sum(
                _local(p).numel()
                for n, p in b.named_parameters(prefix=f"layers.{i}")
                if is_expert[n]
            ),
        )
        for i, b in stage.layers.items()
    ]
    largest, largest_experts = max(blocks, default=(0, 0))
    return StageParams(
        total=sum(local.numel() for _, local in named),
        embedding=sum(local.numel() for n, local in named if n.startswith("tok_embeddings.")),
        layers=len(blocks),
        largest_block=largest,
        shapes=_tally([_shape_key(local) for _, local in named]),
        experts=sum(e.numel() for e in experts),
        block_experts=largest_experts,
        expert_shapes=_tally([_shape_key(e) for e in experts]),
        replicated_experts=sum(n for expert, n in whole if expert),
        replicated_moe=sum(n for expert, n in whole if not expert),
    )


class StageCounter:
    """Per-stage parameter counts for one model, cached so a layout search builds each once."""

    def __init__(self, args: ModelArgs) -> None:
        self.args = args
        self._stages: dict[tuple[int, bool, bool], Decoder] = {}
        self._counts: dict[tuple[int, bool, bool, int], StageParams] = {}

    def stage(self, stage_id: int, counts: list[int], tp: int) -> StageParams:
        """Parameters of stage `stage_id` of the split `counts`, on one rank of a `tp` group.

        Every block of the model has the same shapes, so stages that hold as many blocks and
        the same ends (embedding, head) hold as many parameters: each such kind is split once,
        from a model just long enough to contain it, and sharded once per tp.
        """
        kind = (counts[stage_id], stage_id == 0, stage_id == len(counts) - 1)
        if kind + (tp,) not in self._counts:
            if kind not in self._stages:
                self._stages[kind] = self._split(*kind)
            module = self._stages[kind]
            if tp > 1:
                module = copy.deepcopy(module)  # the plan shards in place
                with warnings.catch_warnings():  # a stage without blocks has no `layers.*` to match
                    warnings.simplefilter("ignore", UserWarning)
                    apply_tensor_parallel(
                        module, model_spec(self.args.family), tp_mesh_without_process_group(tp)
                    )
            patterns = model_spec(self.args.family).expert_parameters
            self._counts[kind + (tp,)] = count_stage(module, patterns)
        return self._counts[kind + (tp,)]

    def whole(self, tp: int = 1) -> StageParams:
        """The unsplit model's parameters on one rank of a `tp` group."""
        return self.stage(0, [self.args.n_layers], tp)

    def _split(self, layers: int, first: bool, last: bool) -> Decoder:
        # a neighbouring one-block stage on each side the kind lacks an end: the real
        # build_stage_module then strips the embedding / head exactly as on the full model
        counts = [1] * (not first) + [layers] + [1] * (not last)
        with torch.device("meta"):
            model = model_spec(self.args.family).build(replace(self.args, n_layers=sum(counts)))
        return build_stage_module(model, 0 if first else 1, counts)


def active_parameters(args: ModelArgs) -> int:
    """Parameters one token goes through, by its family's arithmetic: the spec's
    active_parameter_count (a MoE: all but the routed experts it is not sent to), else all."""
    spec = model_spec(args.family)
    count = spec.active_parameter_count or spec.parameter_count
    return count(args)


def routed_expert_parameters(args: ModelArgs) -> int:
    """Elements of the whole model's routed experts (its spec's expert_parameters), counted on
    a one-block meta model: every block has the same shapes (0 for a dense model)."""
    return _one_block(_key(args))[0] * args.n_layers


def active_expert_share(args: ModelArgs) -> float:
    """The share of the routed experts' parameters one token goes through (top-k of E: k/E),
    from the family's counts of a one-block model and its experts counted on the meta device;
    1 for a dense model (cached: a layout search asks again)."""
    return _one_block(_key(args))[1]


@functools.lru_cache(maxsize=64)
def _one_block(key: tuple) -> tuple[int, float]:
    """(routed-expert elements, active share of them) of the one-block model of `key`."""
    one = replace(ModelArgs(*key), n_layers=1)
    spec = model_spec(one.family)
    if not spec.expert_parameters:
        return 0, 1.0
    with torch.device("meta"):
        model = spec.build(one)
    experts = count_stage(model, spec.expert_parameters).experts
    if spec.active_parameter_count is None or not experts:
        return experts, 1.0
    inactive = spec.parameter_count(one) - spec.active_parameter_count(one)
    return experts, 1 - inactive / experts


def _key(args: ModelArgs) -> tuple:
    return tuple(getattr(args, f.name) for f in fields(ModelArgs))

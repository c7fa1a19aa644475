"""Exact parameter counts per pipeline stage, from the real split and the real TP plan on meta.

Nothing here is a formula: each kind of stage (so many blocks, with or without the embedding
and the head) is cut by the real `build_stage_module` from a meta-device model (its family's spec), sharded
by the real `apply_tensor_parallel` on a device mesh with no process group behind it, and its
local DTensor shards are counted. The counts follow the model, the split and the TP plan
wherever they go; the one assumption is that all blocks have the same shapes.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, replace

import torch
from torch.distributed.device_mesh import DeviceMesh

from models.args import ModelArgs
from models.decoder import Decoder
from models.registry import model_spec
from parallel.pipeline.runtime import build_stage_module
from parallel.tensor_parallel import apply_tensor_parallel


@dataclass(frozen=True)
class StageParams:
    """The parameters one TP rank holds for one pipeline stage (chunk)."""

    total: int  # elements on TP rank 0 (torch chunks unevenly with rank 0 largest)
    embedding: int  # of which the token embedding: a lookup, no matmul FLOPs
    layers: int  # transformer blocks in the stage
    largest_block: int  # elements of its largest block (FSDP's unsharded working set)
    shapes: tuple[tuple[int, int, int], ...]  # (dim 0, elements per dim-0 row, how many)

    def sharded(self, dp: int) -> int:
        """Elements on one dp rank when FSDP2 shards every parameter on dim 0 (ceil, padded)."""
        return sum(math.ceil(d0 / dp) * row * n for d0, row, n in self.shapes)


def tp_mesh_without_process_group(tp: int) -> DeviceMesh:
    """A 1-D "tp" mesh seen from rank 0 that never starts a backend (nothing is communicated)."""
    # _init_backend/_rank are private DeviceMesh arguments: DTensor needs only the coordinate
    # to shard meta tensors, and no process group may start in the planner
    return DeviceMesh("cpu", torch.arange(tp), mesh_dim_names=("tp",), _init_backend=False, _rank=0)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def count_stage(stage: Decoder) -> StageParams:
    """Count the (possibly TP-sharded) parameters of one built stage module."""
    shapes: dict[tuple[int, int], int] = {}
    total = embedding = 0
    for name, p in stage.named_parameters():
        local = _local(p)
        total += local.numel()
        embedding += local.numel() if name.startswith("tok_embeddings.") else 0
        d0 = local.shape[0] if local.dim() else 1
        key = (d0, local.numel() // max(d0, 1))
        shapes[key] = shapes.get(key, 0) + 1
    blocks = [sum(_local(p).numel() for p in b.parameters()) for b in stage.layers.values()]
    return StageParams(
        total,
        embedding,
        len(blocks),
        max(blocks, default=0),
        tuple((d0, row, n) for (d0, row), n in sorted(shapes.items())),
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
            self._counts[kind + (tp,)] = count_stage(module)
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

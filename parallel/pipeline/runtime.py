"""Pipeline parallelism: split the model into pp x virtual_stages chunks and schedule them
(which rank holds which chunk, and each schedule's rules, are parallel/pipeline/registry.py).

Splitting copies the whole model (on the meta device) and deletes what a stage does not own,
so every parameter keeps its full-model name (`layers.7.attention.wq.weight`) on every layout.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    FORWARD,
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    _Action,
    _add_send_recv,
    _add_unshard_reshard,
    _PipelineScheduleRuntime,
    generate_stage_to_rank_mapping,
    get_schedule_class,
)

from models.decoder import Decoder
from parallel.pipeline.costs import StageCosts
from parallel.pipeline.registry import PipelineLayout


def layers_per_stage(n_layers: int, n_stages: int, explicit: list[int] | None = None) -> list[int]:
    """How many transformer blocks each pipeline stage holds.

    Even when n_layers divides; otherwise the embedding and the output head each count as one
    layer of work, so the first and last stages take one block fewer. Anything else must be
    given explicitly: layers are never silently dropped.
    """
    if explicit is not None:
        if len(explicit) != n_stages or sum(explicit) != n_layers or min(explicit) < 0:
            raise ValueError(
                f"needs {n_stages} non-negative entries (pp*virtual_stages) summing to "
                f"n_layers={n_layers}, got {list(explicit)}"
            )
        return list(explicit)
    if n_layers % n_stages == 0:
        return [n_layers // n_stages] * n_stages
    if n_stages > 1 and (n_layers + 2) % n_stages == 0:
        per = (n_layers + 2) // n_stages
        return [per - 1] + [per] * (n_stages - 2) + [per - 1]
    even = [n_layers // n_stages + (1 if i < n_layers % n_stages else 0) for i in range(n_stages)]
    raise ValueError(
        f"n_layers={n_layers} does not split into pp*virtual_stages={n_stages} stages; "
        f"choose pp*virtual_stages dividing {n_layers} (or {n_layers + 2} counting embedding and "
        f"head) or set parallel.layers_per_stage, e.g. {even}"
    )


def build_stage_module(whole: Decoder, stage_id: int, counts: list[int]) -> Decoder:
    """A copy of `whole` keeping only stage `stage_id`'s blocks (plus embedding/head at the ends)."""
    stage = copy.deepcopy(whole)
    first = sum(counts[:stage_id])
    keep = {str(i) for i in range(first, first + counts[stage_id])}
    for name in list(stage.layers.keys()):
        if name not in keep:
            del stage.layers[name]
    if stage_id != 0:
        stage.tok_embeddings = None
    if stage_id != len(counts) - 1:
        stage.norm = None
        stage.output = None
    return stage


def build_schedule(
    modules: Sequence[nn.Module],
    stage_ids: list[int],
    layout: PipelineLayout,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    pp_group: torch.distributed.ProcessGroup,
    costs: StageCosts | None = None,
) -> PipelineScheduleSingle | PipelineScheduleMulti:
    """Wrap each local chunk in a PipelineStage and build the layout's schedule (parallel/pipeline/registry.py).

    The loss function returns the mean over a microbatch's tokens and scale_grads divides the
    summed gradients by the number of microbatches: the gradient of the batch mean. `costs`
    (per stage) are what a searched order (zbv, zb_1p, zb_2p) is searched at; None: equal stages.
    """
    n_stages, microbatches, spec = layout.n_stages, layout.microbatches, layout.spec
    stages = [
        PipelineStage(module, sid, n_stages, device, group=pp_group)
        for module, sid in zip(modules, stage_ids)
    ]
    if spec.order is not None:
        # tridist's order, run by torch's runtime (a private class: the public schedules take
        # no custom order); every rank computes the same order from the same inputs
        sched = _PipelineScheduleRuntime(
            stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True
        )
        set_order(sched, spec.order(layout.pp, n_stages, microbatches, costs))
        return sched
    assert spec.torch_class is not None  # a spec has one or the other
    cls = get_schedule_class(spec.torch_class)
    if issubclass(cls, PipelineScheduleSingle):
        return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)
    return cls(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)


def set_order(sched: _PipelineScheduleRuntime, order: dict[int, list[_Action]]) -> None:
    """Run `order` (compute actions per pipeline rank) from the next step on: torch's lowering
    checks it, maps stages to ranks and adds FSDP unshard/reshard, grad reduction and p2p."""
    sched.pipeline_order = {r: list[_Action | None](actions) for r, actions in order.items()}
    sched._prepare_schedule_with_comms(sched.pipeline_order)


def build_eval_schedule(
    modules: Sequence[nn.Module],
    stage_ids: list[int],
    layout: PipelineLayout,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    pp_group: torch.distributed.ProcessGroup,
) -> _PipelineScheduleRuntime:
    """A forward-only schedule for evaluation, for V-shaped placements and tridist's orders.

    torch 2.13's ZBV and DualPipeV orders keep their backward actions in eval() and fail
    ("can't steal_bwd_input"), as would a custom order's, so evaluation runs its own order:
    every rank passes all microbatches through its first stage, then through its second (if
    any); torch's runtime (a private
    class: the public schedules take no custom order) adds the sends and receives. Separate
    PipelineStage wrappers of the same modules keep the training schedule's buffers untouched.
    """
    n_stages, microbatches, pp = layout.n_stages, layout.microbatches, layout.pp
    stages = [
        PipelineStage(module, sid, n_stages, device, group=pp_group)
        for module, sid in zip(modules, stage_ids)
    ]
    sched = _PipelineScheduleRuntime(stages, n_microbatches=microbatches, loss_fn=loss_fn)
    to_rank = generate_stage_to_rank_mapping(pp, n_stages, style="v" if layout.v_shape else "loop")
    order: dict[int, list[_Action | None]] = {
        rank: [
            _Action(sid, FORWARD, mb)
            for sid in sorted(s for s, r in to_rank.items() if r == rank)
            for mb in range(microbatches)
        ]
        for rank in range(pp)
    }
    # lowered here rather than by _prepare_schedule_with_comms, whose check wants backwards
    sched.stage_index_to_group_rank = to_rank
    for stage in stages:
        stage.stage_index_to_group_rank = to_rank
    sched.pipeline_order = order
    # as torch's own lowering: FSDP unshard/reshard around each stage's compute, then the p2p ops
    with_fsdp = {rank: _add_unshard_reshard(actions) for rank, actions in order.items()}
    sched.pipeline_order_with_comms = _add_send_recv(
        with_fsdp, stage_to_rank=lambda s: to_rank[s], num_stages=n_stages
    )
    return sched

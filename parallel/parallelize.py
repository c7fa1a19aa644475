"""Config in, parallel model out: split into pipeline chunks, then TP, init, recompute, compile,
DP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining.schedules import _PipelineSchedule

from models.llama import ModelArgs, Transformer
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.compile import apply_compile
from parallel.context_parallel import apply_context_parallel, shard_sequence
from parallel.data_parallel import apply_data_parallel, data_parallel_mesh
from parallel.dtensor import full_value
from parallel.init import InitialValues, init_parameters
from parallel.loss import cross_entropy
from parallel.pipeline import (
    build_eval_schedule,
    build_schedule,
    build_stage_module,
    layers_per_stage,
)
from parallel.plan.replay import StageCosts
from parallel.schedules import n_pipeline_stages, schedule_spec, stage_ids_for_rank
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.tied_embeddings import TiedCopies, tie_across_stages


@dataclass
class ParallelModel:
    """The model chunks this rank owns and, under pipelining, the schedule that drives them."""

    chunks: list[Transformer]
    stage_ids: list[int]
    n_stages: int
    schedule: _PipelineSchedule | None
    mesh: DeviceMesh
    eval_schedule: _PipelineSchedule | None = None  # when evaluation needs its own order
    tied: TiedCopies | None = None  # tied embedding and head on different stages

    @property
    def has_first_stage(self) -> bool:
        """True if this rank embeds tokens (feeds the pipeline)."""
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        """True if this rank computes the logits and the loss."""
        return self.n_stages - 1 in self.stage_ids

    def local_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's load-balanced chunks of a [batch, seq] tensor (all of it at cp=1)."""
        return shard_sequence(x, self.mesh["cp"])

    def parameters(self) -> list[torch.nn.Parameter]:
        """All parameters of all local chunks."""
        return [p for chunk in self.chunks for p in chunk.parameters()]


def parallelize(
    args: ModelArgs,
    mesh: DeviceMesh,
    device: torch.device,
    seed: int,
    *,
    virtual_stages: int = 1,
    schedule: str = "1f1b",
    microbatches: int = 1,
    layers: list[int] | None = None,
    dp_shard: bool = True,
    dp_replicate: int = 1,
    cp_comm: str = "all_gather",
    activation_checkpointing: str = "none",
    sequence_parallel: bool = False,
    initial_values: InitialValues | None = None,
    stage_costs: StageCosts | None = None,
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
) -> ParallelModel:
    """Build this rank's part of the model on `mesh`, initialized identically for any layout.

    compile: torch.compile each block (regional). param_dtype: under dp > 1, the dtype FSDP2 or
    replicate all-gather and compute parameters in, gradients reduced in fp32 (None: fp32).
    dp_replicate > 1: HSDP, dp split into that many replica groups of FSDP2-sharded ranks
    (plain replication when a group would hold one rank)."""
    dp, pp, cp, tp = (mesh[d].size() for d in ("dp", "pp", "cp", "tp"))
    with torch.device("meta"):
        whole = Transformer(args)
    n_stages = n_pipeline_stages(pp, virtual_stages, schedule)
    if n_stages == 1:
        stage_ids, chunks = [0], [whole]
    else:
        counts = layers_per_stage(args.n_layers, n_stages, layers)
        stage_ids = stage_ids_for_rank(mesh["pp"].get_local_rank(), pp, virtual_stages, schedule)
        chunks = [build_stage_module(whole, sid, counts) for sid in stage_ids]
    # gradients are averaged over dp and cp: the cp ranks hold the same weights
    shard = dp_shard and dp * cp > dp_replicate  # a shard group of one rank is plain DDP
    dp_mesh = data_parallel_mesh(mesh, dp_replicate if shard else 1) if dp * cp > 1 else None
    for chunk in chunks:
        if tp > 1:
            apply_tensor_parallel(chunk, mesh["tp"], sequence_parallel=sequence_parallel)
        if cp > 1:
            apply_context_parallel(chunk, mesh["cp"], cp_comm)
        chunk.to_empty(device=device)
        chunk.tie_weights()  # a chunk holding embedding and head: one matrix again
        init_parameters(chunk, args, seed, initial_values)
        apply_activation_checkpointing(chunk, activation_checkpointing)
        if compile:
            apply_compile(chunk)
        if dp_mesh is not None:
            apply_data_parallel(
                chunk, dp_mesh, shard=shard, pipelined=pp > 1, param_dtype=param_dtype
            )
    tied = None
    if pp > 1 and args.tie_embeddings:
        last_rank = next(
            r
            for r in range(pp)
            if n_stages - 1 in stage_ids_for_rank(r, pp, virtual_stages, schedule)
        )
        tied = tie_across_stages(chunks, last_rank, mesh)
    sched = None
    if pp > 1:
        sched = build_schedule(
            chunks,
            stage_ids,
            n_stages,
            schedule,
            microbatches,
            cross_entropy,
            device,
            mesh["pp"].get_group(),
            stage_costs,
        )
    eval_sched, spec = sched, schedule_spec(schedule)
    if (spec.placement == "v" or spec.order is not None) and pp > 1:  # their eval() fails
        eval_sched = build_eval_schedule(
            chunks,
            stage_ids,
            n_stages,
            microbatches,
            cross_entropy,
            device,
            mesh["pp"].get_group(),
            v_shape=spec.placement == "v",
        )
    return ParallelModel(chunks, stage_ids, n_stages, sched, mesh, eval_sched, tied)


def full_state_dict(model: ParallelModel) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters of this rank's chunks, by full-model name (a tied head on
    a stage without the embedding under its own name, `output.weight`).

    Collective over dp and tp: every rank of those groups must call it.
    """
    out = {}
    for chunk in model.chunks:
        for fqn, p in chunk.named_parameters():
            out[fqn] = full_value(p).detach().cpu().clone()
    return out

"""Config in, parallel model out: split into pipeline chunks, then TP, init, recompute, compile,
DP."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining.schedules import _PipelineSchedule

from models.args import ModelArgs
from models.decoder import Decoder
from models.registry import model_spec
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.compile import apply_compile
from parallel.context_parallel import apply_context_parallel, shard_sequence
from parallel.data_parallel import apply_data_parallel, data_parallel_mesh
from parallel.dtensor import full_value
from parallel.expert_parallel import ExpertGradients, apply_expert_parallel, expert_mesh
from parallel.init import InitialValues, init_parameters
from parallel.loss import cross_entropy
from parallel.pipeline.costs import StageCosts
from parallel.pipeline.registry import PipelineLayout, pipeline_layout
from parallel.pipeline.runtime import (
    build_eval_schedule,
    build_schedule,
    build_stage_module,
    layers_per_stage,
)
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.tied_embeddings import TiedCopies, tie_across_stages


@dataclass(frozen=True, kw_only=True)
class ParallelOptions:
    """How to parallelize beyond the mesh's sizes: the resolved pipeline and every option, built
    once from the config (launcher/run/build.py) and passed whole."""

    pipeline: PipelineLayout = field(default_factory=lambda: pipeline_layout("1f1b", 1))
    layers: list[int] | None = None  # blocks per pipeline stage (None: the even split)
    dp_shard: bool = True  # FSDP2 over dp (False: replicate, DDP-style)
    dp_replicate: int = 1  # HSDP: replica groups of FSDP2-sharded ranks
    cp_comm: str = "all_gather"
    activation_checkpointing: str = "none"
    sequence_parallel: bool = False
    stage_costs: StageCosts | None = None  # what a searched order is searched at
    compile: bool = False  # torch.compile each block (regional)
    param_dtype: torch.dtype | None = None  # FSDP2/replicate compute dtype (None: fp32)
    ep: int = 1  # expert parallelism: MoE experts split over ep ranks of dp x cp


@dataclass
class ParallelModel:
    """The model chunks this rank owns and, under pipelining, the schedule that drives them."""

    chunks: list[Decoder]
    stage_ids: list[int]
    pipeline: PipelineLayout
    schedule: _PipelineSchedule | None
    mesh: DeviceMesh
    eval_schedule: _PipelineSchedule | None = None  # when evaluation needs its own order
    tied: TiedCopies | None = None  # tied embedding and head on different stages
    experts: ExpertGradients | None = None  # ep > 1: the expert gradients FSDP leaves alone

    @property
    def n_stages(self) -> int:
        """Pipeline stages in all (1 without pipelining)."""
        return self.pipeline.n_stages

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
    options: ParallelOptions | None = None,
    initial_values: InitialValues | None = None,
) -> ParallelModel:
    """Build this rank's part of the model on `mesh`, initialized identically for any layout
    (`initial_values`: where the weights come from; default drawn from `seed`).

    dp_replicate > 1: HSDP, dp split into that many replica groups of FSDP2-sharded ranks
    (plain replication when a group would hold one rank)."""
    o = options or ParallelOptions()
    dp, pp, cp, tp = (mesh[d].size() for d in ("dp", "pp", "cp", "tp"))
    if o.pipeline.pp != pp:
        raise ValueError(f"the pipeline layout has pp={o.pipeline.pp}, the mesh pp={pp}")
    spec = model_spec(args.family)  # what to build and how to shard it: the family's
    with torch.device("meta"):
        whole = spec.build(args)
    if o.pipeline.n_stages == 1:
        stage_ids, chunks = [0], [whole]
    else:
        counts = layers_per_stage(args.n_layers, o.pipeline.n_stages, o.layers)
        stage_ids = o.pipeline.stage_ids(mesh["pp"].get_local_rank())
        chunks = [build_stage_module(whole, sid, counts) for sid in stage_ids]
    # gradients are averaged over dp and cp: the cp ranks hold the same weights
    shard = o.dp_shard and dp * cp > o.dp_replicate  # a shard group of one rank is plain DDP
    dp_mesh = data_parallel_mesh(mesh, o.dp_replicate if shard else 1) if dp * cp > 1 else None
    ep_mesh = expert_mesh(mesh, o.ep) if o.ep > 1 else None
    expert_params: list[torch.nn.Parameter] = []
    for chunk in chunks:
        if tp > 1:
            apply_tensor_parallel(chunk, spec, mesh["tp"], sequence_parallel=o.sequence_parallel)
        chunk_experts = []
        if ep_mesh is not None:
            chunk_experts = apply_expert_parallel(chunk, ep_mesh["ep"])
            expert_params += chunk_experts
        if cp > 1:
            apply_context_parallel(chunk, mesh["cp"], o.cp_comm)
        chunk.to_empty(device=device)
        chunk.tie_weights()  # a chunk holding embedding and head: one matrix again
        init_parameters(chunk, args, seed, initial_values)
        apply_activation_checkpointing(chunk, o.activation_checkpointing)
        if o.compile:
            apply_compile(chunk)
        if dp_mesh is not None:
            apply_data_parallel(
                chunk,
                dp_mesh,
                shard=shard,
                pipelined=pp > 1,
                param_dtype=o.param_dtype,
                ignored=set(chunk_experts),
            )
    tied = None
    if pp > 1 and args.tie_embeddings:
        last_rank = o.pipeline.rank_of_stage(o.pipeline.n_stages - 1)
        tied = tie_across_stages(chunks, last_rank, mesh)
    sched = eval_sched = None
    if pp > 1:
        group = mesh["pp"].get_group()
        sched = eval_sched = build_schedule(
            chunks, stage_ids, o.pipeline, cross_entropy, device, group, o.stage_costs
        )
        if o.pipeline.v_shape or o.pipeline.spec.order is not None:  # their eval() fails
            eval_sched = build_eval_schedule(
                chunks, stage_ids, o.pipeline, cross_entropy, device, group
            )
    return ParallelModel(
        chunks=chunks,
        stage_ids=stage_ids,
        pipeline=o.pipeline,
        schedule=sched,
        mesh=mesh,
        eval_schedule=eval_sched,
        tied=tied,
        experts=ExpertGradients(expert_params, ep_mesh["dp_cp_mod_ep"], dp * cp)
        if ep_mesh is not None
        else None,
    )


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

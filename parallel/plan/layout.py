"""What the planner estimates: a parallel layout of one model on a cluster, as plain values."""

from __future__ import annotations

from dataclasses import dataclass

from models.args import ModelArgs
from models.registry import model_spec
from parallel.pipeline.registry import PipelineLayout, pipeline_layout


def is_moe(args: ModelArgs) -> bool:
    """True if the family's blocks have a routed Mixture-of-Experts feed-forward."""
    return model_spec(args.family).block_feed_forward == "moe"


@dataclass(frozen=True)
class Layout:
    """How the model is split and run: the mesh, the schedule and per-rank memory choices."""

    dp: int
    pp: int
    tp: int
    virtual_stages: int
    schedule: str  # a name of parallel/pipeline/registry.py
    microbatches: int
    layers_per_stage: tuple[int, ...] | None = None  # None: the even split
    sequence_parallel: bool = False
    dp_shard: bool = True  # FSDP over dp; False replicates
    recompute: str = "none"  # activation checkpointing: none | selective | full
    cp: int = 1  # context parallelism: each sequence split across cp GPUs
    cp_comm: str = "all_gather"  # all_gather | ring
    dp_replicate: int = 1  # HSDP: replica groups of dp (1: FSDP over all of dp)
    # expert parallelism: a MoE's routed experts split over ep GPUs of dp x cp (1: not split)
    ep: int = 1

    @property
    def gpus(self) -> int:
        """GPUs the layout occupies: dp * pp * cp * tp."""
        return self.dp * self.pp * self.cp * self.tp

    @property
    def pipeline(self) -> PipelineLayout:
        """The schedule resolved on this layout's pp, virtual stages and microbatches."""
        return pipeline_layout(self.schedule, self.pp, self.virtual_stages, self.microbatches)

    @property
    def shard_group(self) -> int:
        """GPUs FSDP shards over: dp / dp_replicate groups times cp (1: nothing sharded)."""
        return self.dp * self.cp // self.dp_replicate if self.dp_shard else 1


@dataclass(frozen=True)
class Cluster:
    """The machines: how many, their memory, links and dense peak."""

    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    intra_node_gbps: float  # GB/s per GPU inside a node (NVLink)
    inter_node_gbps: float  # GB/s per GPU across nodes
    peak_tflops: float  # dense bf16 TFLOP/s per GPU


@dataclass(frozen=True, kw_only=True)
class RankContext:
    """One pipeline rank of a layout as the memory and traffic formulas read it (any one of its
    tp x cp x dp GPUs): the model, how the GPU's share is cut, and the stages it runs."""

    args: ModelArgs
    tokens: int  # one GPU's tokens of one microbatch (a 1/cp slice of its sequences)
    microbatches: int = 1
    layers: int = 0  # transformer blocks the rank holds
    stage_ids: tuple[int, ...] = (0,)
    n_stages: int = 1
    tp: int = 1
    sequence_parallel: bool = False
    cp: int = 1
    cp_comm: str = "all_gather"
    recompute: str = "none"  # activation checkpointing: none | selective | full
    ep: int = 1  # expert parallelism (GPUs of dp x cp the routed experts are split over)

    @property
    def moe_layers(self) -> int:
        """How many of the rank's blocks have a routed MoE feed-forward (all or none)."""
        return self.layers if is_moe(self.args) else 0

    @property
    def pipelined(self) -> bool:
        """True under pipeline parallelism (stages exchange activations)."""
        return self.n_stages > 1

    @property
    def last_stage(self) -> bool:
        """True if the rank computes the head and the loss."""
        return self.n_stages - 1 in self.stage_ids

    @property
    def ends(self) -> int:
        """How many of the embedding and the head the rank holds (0, 1 or 2)."""
        return (0 in self.stage_ids) + self.last_stage

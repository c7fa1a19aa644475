"""The one typed config schema: every key, its type and its default (conf/ holds only what
differs per flavor or group).

Hydra composes YAML from conf/ on top of these defaults; `load_config` merges the result onto
the dataclasses (so a wrong type is caught with its key); launcher/validate.py checks values.
Every failure is a ConfigError naming the field, the value and a fix; the entry point prints it
on one line and exits with code 2 (launcher/errors.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.args import ModelArgs


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the value and the fix."""

    def __init__(self, field_name: str, value: object, fix: str) -> None:
        super().__init__(f"config error: {field_name}={value!r}: {fix}")
        self.field_name = field_name


@dataclass
class ModelConfig(ModelArgs):
    """Model flavor: the architecture plus how to build and initialize it."""

    # the default flavor, tiny (~3M parameters, byte-level vocabulary); ModelArgs has the rest
    name: str = "tiny"
    n_kv_heads: int | None = 4
    max_seq_len: int = 1024
    activation_checkpointing: str = "none"  # none | full | selective
    init_from: str | None = None  # a Hugging Face directory of the model's family


@dataclass
class DataConfig:
    """Where tokens come from."""

    source: str = "stdlib"  # stdlib | tokens | text | indexed
    path: str | None = None
    # source=indexed: Megatron .bin/.idx prefixes, [w1, prefix1, w2, prefix2, ...] (weights
    # normalised) or [prefix1, prefix2, ...] (equal weights), blended as Megatron blends them
    paths: list[Any] = field(default_factory=list)
    tokenizer: str | None = None  # Hugging Face tokenizer.json, for source=text (or decoding)
    val_fraction: float = 0.05
    max_bytes: int = 4_000_000
    # documents packed into a sequence, told apart by the source's end-of-document id (EOS):
    # RoPE positions restarting per document, block-causal attention (no token attends across
    # a document boundary), and no loss on the EOS -> next-document target
    reset_position_ids: bool = False
    document_mask: bool = False
    eod_mask_loss: bool = False


@dataclass
class ParallelConfig:
    """The device mesh (dp, pp, cp, tp) and the pipeline schedule."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    cp: int = 1  # context parallelism: each sequence split across cp ranks (between pp and tp)
    cp_comm: str = "all_gather"  # all_gather | ring: how attention reaches the other chunks' K/V
    dp_replicate: int = 1  # HSDP: dp = dp_replicate groups x (dp / dp_replicate) sharded ranks
    # expert parallelism: a MoE model's experts split over ep ranks borrowed from dp x cp
    # (TorchTitan's way): no ranks of its own, tokens reach their experts by all-to-all
    ep: int = 1
    virtual_stages: int = 1
    schedule: str = "1f1b"
    microbatches: int = 1
    # blocks per pipeline stage: null (the even split unless the cost model's is faster), even,
    # auto (parallel/pipeline/split.py), or a list of pp*virtual_stages counts
    layers_per_stage: Any = None
    # zbv, zb_1p and zb_2p search their order at these per-stage costs: one [F, I, W] (ms, or any unit)
    # per pipeline stage, and p2p_ms per transfer; null: equal stages
    stage_costs: list[list[float]] | None = None
    p2p_ms: float = 0.0
    dp_shard: bool = True  # FSDP2 over dp; false replicates (DDP-style)
    sequence_parallel: bool = False
    allow_cross_node_tp: bool = False
    timeline: bool = False  # record one step's pipeline actions on every rank (trace + PNG)

    @property
    def world_size(self) -> int:
        """Ranks the layout needs: dp * pp * cp * tp."""
        return self.dp * self.pp * self.cp * self.tp

    def layout_product(self) -> str:
        """`dp*pp*tp = 2*2*2 = 8` (cp named only when used), for messages about the world size."""
        dims = ("dp", "pp", "cp", "tp") if self.cp > 1 else ("dp", "pp", "tp")
        names, values = "*".join(dims), "*".join(str(getattr(self, d)) for d in dims)
        return f"{names} = {values} = {self.world_size}"


@dataclass
class TrainConfig:
    """Length, batch and seed of the run."""

    steps: int = 240
    global_batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    log_interval: int = 10
    val_interval: int = 100
    val_batches: int = 4
    sample_tokens: int = 240
    resume: str = "none"
    # on resume, keys defining what was trained (model, data, seq_len, seed) may change only
    # when listed here, e.g. [model.rope_theta]; the others always take the new value
    resume_allow_changes: list[str] = field(default_factory=list)
    # a non-finite loss or gradient norm is never applied: stop the run after that step (exit
    # code 1, the last good checkpoint stays the newest), or skip the update and stop only after
    # nonfinite_max_skips skipped steps in a row
    nonfinite: str = "stop"  # stop | skip
    nonfinite_max_skips: int = 3
    # torch.compile each transformer block (Inductor; C++ on CPU); not with the zero-bubble
    # schedules (interleaved_zb, zbv, zbv_torch, dualpipev, zb_*), whose I/W split torch 2.13
    # runs only with eager stages
    compile: bool = False


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # AdamW's kernel: auto (fused where torch has it for every parameter, else foreach) |
    # for_loop | foreach | fused; the same update in fp32 up to rounding
    implementation: str = "auto"


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written (see parallel/checkpoint/save.py)."""

    dir: str | None = None  # default: <run dir>/checkpoints
    interval: int = 0  # save every N steps; 0 = only at the end (and on a preemption signal)
    keep: int = (
        3  # complete checkpoints kept (the final one included); older ones deleted after a save
    )
    final: bool = True  # save at the end of the run (false: only every interval and on a signal)
    async_save: bool = False  # write in the background; the step loop waits only for staging
    verify: bool = True  # check shard CRC32s when loading


@dataclass
class WandbConfig:
    """Weights & Biases: online when WANDB_API_KEY is set, offline otherwise."""

    enabled: bool = False
    project: str = "tridist"
    entity: str | None = None
    name: str | None = None


@dataclass
class LoggingConfig:
    """Where metrics go besides the console and metrics.jsonl."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines


@dataclass
class ObserveConfig:
    """Straggler report and hang watchdog (launcher/run/observe.py); on by default, < 1% cost."""

    enabled: bool = True
    interval: int = 10  # steps between the phase-time gathers (one all_gather each)
    # a working phase (data, compute, optimizer, checkpoint) stands out when its relative score
    # (the best rank's time / this rank's) is below this and it exceeds the median rank's by 10%
    # of the step
    straggler_score: float = 0.5
    hang_timeout_s: float = 600.0  # seconds without progress before the hang report; 0: no watchdog
    flight_recorder: bool = True  # NCCL runs: torch's flight recorder dumps into the run folder


@dataclass
class ProfileConfig:
    """torch.profiler traces of chosen steps on chosen ranks (parallel/observe/profile.py)."""

    steps: list[int] = field(default_factory=list)  # [first, last], 1-based; []: no profile
    ranks: list[int] = field(default_factory=lambda: [0])
    memory: bool = True  # CPU memory profile; on CUDA also the allocator's memory snapshot


@dataclass
class HardwareConfig:
    """Peak dense TFLOP/s per device, for MFU and the planner; null = from the GPU's name
    (required on CPU for MFU), or H100 SXM's for a plan."""

    peak_tflops: float | None = None


@dataclass
class ClusterConfig:
    """The machines a plan is made for (launcher/plan.py); training ignores it."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    intra_node_gbps: float = 450.0  # GB/s per GPU inside a node (NVLink)
    inter_node_gbps: float = 50.0  # GB/s per GPU across nodes (400 Gb/s InfiniBand)
    # the GPUs' peak TFLOP/s is hardware.peak_tflops (null: H100 SXM's 989 for a plan)


@dataclass
class FaultToleranceConfig:
    """torchft replica groups: the HSDP replicate dim (parallel.dp_replicate groups) survives a
    group that dies; each group is its own torchrun of dp/dp_replicate * pp * cp * tp ranks."""

    enable: bool = False
    replica_id: int = 0  # this group's index in [0, group_size): its slice of every batch
    group_size: int | None = None  # replica groups; null = parallel.dp_replicate (must equal it)
    min_replicas: int = 1  # fewer live groups than this: no step is committed, they wait
    # the torchft lighthouse, http://host:port; null: $TORCHFT_LIGHTHOUSE (python -m
    # launcher.ft_local starts one and sets it)
    lighthouse: str | None = None
    # a missing replica's share of the global batch: shrink (the step averages the live groups'
    # slices; the only mode so far, see README "Fault tolerance")
    missing_batch: str = "shrink"
    timeout_s: float = 30.0  # quorum, cross-replica collectives and healing transfers


@dataclass
class Config:
    """Everything a training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16


def register_schema() -> None:
    """Give Hydra every schema key with its default (untyped) as `schema_defaults`, the base of
    conf/config.yaml, so any field can be overridden and the defaults live here only; types are
    checked afterwards by load_config, which reports them as ConfigErrors. Idempotent."""
    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    ConfigStore.instance().store(name="schema_defaults", node=defaults)


def load_config(raw: DictConfig) -> Config:
    """Merge Hydra's composed config onto the typed schema; type errors become ConfigErrors."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        reason = str(err).splitlines()[0]
        raise ConfigError(
            key, getattr(err, "value", None), f"{reason}; fix the value or its type"
        ) from None

"""The training loop: one step = all microbatches of a global batch, then clip and update.

Loss semantics match one process whatever the layout: each microbatch contributes its token
mean divided by the number of microbatches, and data parallelism averages across dp ranks.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from data import DistributedBatchSampler
from data.documents import document_inputs, mask_document_ends
from launcher.config import Config
from models.moe import set_aux_loss_scale
from parallel.dtensor import local_part
from parallel.expert_load import reset_expert_load
from parallel.fault_tolerance import ReplicaGroup
from parallel.grad_clip import clip_grad_norm
from parallel.loss import counted_token_weight, cross_entropy, loss_context, scale_gradients
from parallel.parallelize import ParallelModel
from parallel.tied_embeddings import sum_tied_gradients

# AdamW's flags per optim.implementation; torch's own default on CPU is the for-loop
ADAMW_KERNELS = {
    "for_loop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"foreach": False, "fused": True},
}
FUSED_DEVICES = ("cpu", "cuda")  # torch 2.13's fused AdamW kernels


def adamw_implementation(implementation: str, params: list[torch.nn.Parameter]) -> str:
    """The AdamW kernel to run: `auto` is fused (fastest here, BENCHMARKS.md §4) where every
    parameter is a floating tensor on a device torch has the fused kernel for, else foreach."""
    if implementation != "auto":
        return implementation
    fused = all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    return "fused" if fused else "foreach"


def build_optimizer(model: ParallelModel, cfg: Config) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms (1-D parameters), as in Llama."""
    params = model.parameters()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    o = cfg.optim
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        **ADAMW_KERNELS[adamw_implementation(o.implementation, params)],
    )


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine as a LambdaLR (its state is saved with checkpoints)."""
    o, steps = cfg.optim, cfg.train.steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, o.warmup_steps, steps, o.min_lr_ratio)
    )


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast where asked, and by default on CUDA; fp32 otherwise."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where uses_bf16 says so; plain fp32 otherwise."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _set_gradient_sync(model: ParallelModel, enabled: bool) -> None:
    for chunk in model.chunks:
        if isinstance(chunk, FSDPModule):
            chunk.set_requires_gradient_sync(enabled)


def _microbatches(batch: dict[str, torch.Tensor], m: int) -> list[dict[str, torch.Tensor]]:
    """Keyword inputs of a batch split into m microbatches along the batch dim."""
    if not batch:
        return [{}] * m
    return [dict(zip(batch, parts)) for parts in zip(*(t.chunk(m) for t in batch.values()))]


@dataclass
class StepResult:
    """What one optimizer step produced, as tensors (no host sync until someone reads them)."""

    loss: torch.Tensor  # this rank's mean loss (0 on ranks without the last stage)
    grad_norm: torch.Tensor
    applied: bool = True  # False: the gradient norm was not finite and the update was skipped
    committed: bool = True  # False: a replica failed during the step; it runs again (torchft)


@dataclass
class Trainer:
    """Drives one ParallelModel through forward, backward and update, step after step."""

    cfg: Config
    model: ParallelModel
    sampler: DistributedBatchSampler
    device: torch.device
    optimizer: torch.optim.Optimizer = field(init=False)
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    step: int = 0
    eos_id: int | None = None  # the token source's end-of-document id (data.document_mask etc.)
    replicas: ReplicaGroup | None = None  # fault_tolerance.enable: torchft's replica groups

    def __post_init__(self) -> None:
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.cfg)
        self._tp = self.model.mesh["tp"].size()
        self._stepped = False  # whether a step ran (the pipeline's first infers its shapes)
        # MoE auxiliary losses weigh as each microbatch's loss does: pipelining divides the
        # gradients after backward, the loop below each microbatch's loss before it
        scale = 1.0 if self.model.schedule is not None else 1 / self.cfg.parallel.microbatches
        for chunk in self.model.chunks:
            set_aux_loss_scale(chunk, scale)

    def apply_optim_config(self) -> None:
        """Make the optimizer and LR schedule follow cfg.optim from the current step on; after a
        resume the loaded settings are the old run's, and a changed optim.lr must take effect.
        Unchanged settings give bitwise the same values (the LambdaLR's own product)."""
        o = self.cfg.optim
        decay, no_decay = self.optimizer.param_groups  # as build_optimizer made them
        self.lr_scheduler.base_lrs = [o.lr, o.lr]
        multiplier = lr_multiplier(
            self.lr_scheduler.last_epoch, o.warmup_steps, self.cfg.train.steps, o.min_lr_ratio
        )
        # the kernel too: a checkpoint's param groups carry the saving run's foreach/fused
        kernel = ADAMW_KERNELS[adamw_implementation(o.implementation, self.model.parameters())]
        for group, weight_decay in ((decay, o.weight_decay), (no_decay, 0.0)):
            group.update(
                lr=o.lr * multiplier,
                initial_lr=o.lr,
                betas=(o.beta1, o.beta2),
                eps=o.eps,
                weight_decay=weight_decay,
                **kernel,
            )

    def documents(self, inputs: torch.Tensor) -> dict[str, Any]:
        """The model's document inputs (doc_ids, positions) for a whole [b, s] batch, as
        data.document_mask / data.reset_position_ids ask: whole sequences on every cp rank
        (attention needs the ids of the K/V it sees) and every pp stage (torch's schedules pass
        step()'s keyword arguments, split by microbatch, to every stage's forward)."""
        d = self.cfg.data
        if self.eos_id is None:
            return {}
        return document_inputs(
            inputs, self.eos_id, mask=d.document_mask, reset_positions=d.reset_position_ids
        )

    def loss_targets(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(targets, weight): under data.eod_mask_loss the EOS -> next-document targets are
        masked and weight is counted_token_weight's global factor; else (targets, None)."""
        if not self.cfg.data.eod_mask_loss or self.eos_id is None:
            return targets, None
        targets = mask_document_ends(inputs, targets, self.eos_id).to(self.device)
        return targets, counted_token_weight(targets, self.model.mesh["dp"])

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Accumulate gradients over the microbatches of this rank's batch; return its mean loss."""
        m = self.cfg.parallel.microbatches
        inputs = inputs.to(self.device)
        docs = self.documents(inputs)  # from the whole sequence, before cp takes its chunks
        inputs, targets = (self.model.local_sequence(t.to(self.device)) for t in (inputs, targets))
        with autocast(self.device, self.cfg.precision), loss_context(self._tp):
            if self.model.schedule is not None:
                losses: list[torch.Tensor] = []
                args = (inputs,) if self.model.has_first_stage else ()
                target = targets if self.model.has_last_stage else None
                self.model.schedule.step(*args, target=target, losses=losses, **docs)
                if not losses:
                    return torch.zeros((), device=self.device)
                return local_part(torch.stack([local_part(x) for x in losses]).mean())
            chunk = self.model.chunks[0]
            total = torch.zeros((), device=self.device)
            parts = _microbatches(docs, m)
            for i, (x, y) in enumerate(zip(inputs.chunk(m), targets.chunk(m))):
                _set_gradient_sync(self.model, i == m - 1)  # reduce across dp once, at the end
                loss = cross_entropy(chunk(x, **parts[i]), y) / m
                loss.backward()
                total += local_part(loss.detach())
            return total

    def train_step(self) -> StepResult:
        """One optimizer step on the next global batch."""
        if self.replicas is not None:  # the quorum first: a healing group loads step and sampler
            self.replicas.start_step()
        inputs, targets = self.sampler.next_batch()
        targets, weight = self.loss_targets(inputs, targets)
        loss = self.forward_backward(inputs, targets)
        if not self._stepped and self.model.schedule is not None:
            reset_expert_load(self.model.chunks)  # the metadata inference's extra forwards
        self._stepped = True
        if self.replicas is not None:
            self.replicas.finish_backward()
        if self.model.experts is not None:  # expert parallelism: the gradients FSDP leaves alone
            self.model.experts.reduce()
        if weight is not None:  # the mean over the counted tokens of the global batch
            scale_gradients(self.model.parameters(), weight)
            loss = loss * weight
        tied = self.model.tied
        if tied is not None:  # the copies of a tied matrix get one gradient, before clipping
            sum_tied_gradients(tied)
        grad_norm = clip_grad_norm(
            self.model.parameters(),
            self.cfg.optim.grad_clip,
            self.model.mesh,
            tied=tied.params if tied is not None else (),
        )
        # The step's one host sync: a NaN/inf must never reach the weights. The norm is global
        # (reduced over tp, dp and pp), so every rank takes the same decision; a non-finite loss
        # makes the gradients, and so the norm, non-finite too.
        applied = bool(torch.isfinite(grad_norm).item())
        # torchft: every rank of the group agrees; False if a replica died mid-step
        committed = self.replicas is None or self.replicas.should_commit()
        if not committed:  # the same batch again, with the replicas that are left
            self.optimizer.zero_grad(set_to_none=True)
            self.sampler.samples_consumed -= self.sampler.global_batch_size
            return StepResult(loss, grad_norm, applied, committed=False)
        if applied:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(loss, grad_norm, applied)

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Mean loss over fixed validation batches (every rank evaluates the same ones)."""
        total = torch.zeros((), device=self.device)
        with autocast(self.device, self.cfg.precision), loss_context(self._tp):
            for inputs, targets in batches:
                inputs = inputs.to(self.device)
                targets, weight = self.loss_targets(inputs, targets)
                docs = self.documents(inputs)
                inputs, targets = (
                    self.model.local_sequence(t.to(self.device)) for t in (inputs, targets)
                )
                loss = torch.zeros((), device=self.device)
                if self.model.schedule is None:
                    loss = local_part(cross_entropy(self.model.chunks[0](inputs, **docs), targets))
                else:
                    losses: list[torch.Tensor] = []
                    args = (inputs,) if self.model.has_first_stage else ()
                    target = targets if self.model.has_last_stage else None
                    # V shapes: forward-only
                    schedule = self.model.eval_schedule or self.model.schedule
                    schedule.eval(*args, target=target, losses=losses, **docs)
                    if losses:
                        loss = local_part(torch.stack([local_part(x) for x in losses]).mean())
                total += loss if weight is None else loss * weight
        return total / len(batches)

    def global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average per-rank losses (a scalar or a stack of steps) over dp and cp, taken from the
        last pipeline stage; a collective over all ranks, no host sync."""
        value = value.detach().clone()
        if dist.get_world_size() > 1:
            # ranks without the last stage hold 0; every tp rank of it holds the same value; cp
            # ranks hold the means of equally many tokens, so their mean is the sequence's
            dist.all_reduce(value)
            value /= dist.get_world_size() // self.model.mesh["pp"].size()
        return value


def timed_steps(trainer: Trainer, n: int) -> float:
    """Run n steps and return their wall time in seconds (syncing once at the end)."""
    start = time.perf_counter()
    for _ in range(n):
        result = trainer.train_step()
    result.loss.item()  # one host sync so queued device work is counted
    return time.perf_counter() - start

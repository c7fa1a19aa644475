"""`python -m launcher.bench overhead`: tridist's real training step against a bare PyTorch
loop of the same model, data, optimizer and schedule, interleaved in one process so machine
noise hits both alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data import DistributedBatchSampler, SampleRows
from launcher.benchmarks.machine import machine
from launcher.config import Config
from launcher.run.build import build_trainer, load_data, model_args
from launcher.run.compose import compose_config
from launcher.run.trainer import ADAMW_KERNELS, adamw_implementation, lr_multiplier, timed_steps
from models.registry import model_spec


class BareLoop:
    """The same training step written as plain PyTorch, as a user would without tridist."""

    def __init__(self, cfg: Config, model: nn.Module, tokens: torch.Tensor | SampleRows) -> None:
        o, t = cfg.optim, cfg.train
        self.model, self.clip = model, o.grad_clip
        self.sampler = DistributedBatchSampler(tokens, t.seq_len, t.global_batch_size, 0, 1, t.seed)
        params = list(model.parameters())
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            **ADAMW_KERNELS[adamw_implementation(o.implementation, params)],  # as the trainer's
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, o.warmup_steps, t.steps, o.min_lr_ratio)
        )

    def train_step(self) -> torch.Tensor:
        """One step: forward, loss, backward, clip, update; returns the loss."""
        x, y = self.sampler.next_batch()
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten(0, 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


@dataclass
class OverheadResult:
    """Tokens/s of tridist's step and of the bare loop, measured side by side."""

    tridist_tokens_per_s: float  # over the summed step times
    bare_tokens_per_s: float
    pair_ratios: list[float]  # bare step time / tridist step time, for each adjacent pair
    loss_diff: float  # |tridist - bare| loss on one batch after training: 0 if same work
    machine: str

    @property
    def ratio(self) -> float:
        """tridist / bare tokens/s over all timed steps; 1.0 means no overhead."""
        return self.tridist_tokens_per_s / self.bare_tokens_per_s

    @property
    def median_ratio(self) -> float:
        """The median of the pair ratios: robust to bursts of load from other processes."""
        return statistics.median(self.pair_ratios)


def overhead(
    steps: int = 30,
    model: str = "tiny",
    warmup: int = 3,
    seq_len: int = 256,
    batch: int = 8,
    overrides: tuple[str, ...] = (),
) -> OverheadResult:
    """Time tridist's Trainer and a bare loop step by step, alternating A B B A A B ..."""
    if min(steps, warmup) < 1:
        raise ValueError(f"steps and warmup must be >= 1; got {steps}, {warmup}")
    cfg = compose_config(
        [
            f"model={model}",
            f"train.seq_len={seq_len}",
            "device=cpu",
            f"train.global_batch_size={batch}",
            "precision=fp32",
            f"train.steps={warmup + steps}",
            "train.sample_tokens=0",
            *overrides,
        ],
        world_size=1,
    )
    tokens = load_data(cfg)
    owns_group = not dist.is_initialized()
    trainer = build_trainer(cfg, tokens)  # a one-rank process group and mesh
    bare_model = model_spec(cfg.model.family).build(model_args(cfg))
    bare_model.load_state_dict(trainer.model.chunks[0].state_dict())  # the same initial weights
    bare = BareLoop(cfg, bare_model, tokens.train)

    def timed_bare(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            loss = bare.train_step()
        loss.item()  # one host sync, as timed_steps does
        return time.perf_counter() - start

    timed_steps(trainer, warmup)
    timed_bare(warmup)
    pairs = []
    for i in range(steps):  # neighbours in time share the machine's load; alternate who leads
        if i % 2:
            b = timed_bare(1)
        a = timed_steps(trainer, 1)
        if not i % 2:
            b = timed_bare(1)
        pairs.append((a, b))
    with torch.no_grad():
        x, y = trainer.sampler.next_batch()
        la = F.cross_entropy(trainer.model.chunks[0](x).flatten(0, 1), y.flatten(0, 1))
        lb = F.cross_entropy(bare_model(x).flatten(0, 1), y.flatten(0, 1))
    if owns_group:
        dist.destroy_process_group()
    n_tokens = steps * batch * seq_len
    return OverheadResult(
        n_tokens / sum(a for a, _ in pairs),
        n_tokens / sum(b for _, b in pairs),
        [b / a for a, b in pairs],
        abs(la.item() - lb.item()),
        machine(),
    )


def format_overhead(r: OverheadResult) -> str:
    """The overhead result as a small Markdown table."""
    q = statistics.quantiles(r.pair_ratios, n=4) if len(r.pair_ratios) > 1 else r.pair_ratios * 3
    return "\n".join(
        [
            f"machine: {r.machine}",
            f"{len(r.pair_ratios)} timed steps each, alternating A B B A (warm-up excluded)",
            "| loop | tokens/s |",
            "|---|---:|",
            f"| tridist Trainer.train_step | {r.tridist_tokens_per_s:,.0f} |",
            f"| bare PyTorch loop | {r.bare_tokens_per_s:,.0f} |",
            f"ratio tridist/bare: {r.ratio:.3f} over all steps; median of step pairs "
            f"{r.median_ratio:.3f} (quartiles {q[0]:.3f}, {q[2]:.3f}); loss difference "
            f"{r.loss_diff:.2e}",
        ]
    )

"""zbv, zb_1p and zb_2p without parallel.stage_costs: search their order at the costs measured on the
run's second step (the first infers shapes), log it with its predicted bubble, and run it from
the third step on (whose timeline, with parallel.timeline=true, shows it)."""

from __future__ import annotations

from launcher.config import Config
from launcher.run.monitor import RunMonitor
from launcher.run.trainer import StepResult, Trainer
from parallel.pipeline.tuning import tune_order

TUNE_AFTER = 2  # the run's second step: the first one infers shapes and allocates buffers


def searched_order_step(cfg: Config, trainer: Trainer) -> int | None:
    """The step whose measured costs the order is searched at, or None (not searched, or the
    costs are given)."""
    pipeline = trainer.model.pipeline
    if pipeline.pp == 1 or not pipeline.spec.searched or cfg.parallel.stage_costs is not None:
        return None
    return trainer.step + TUNE_AFTER


def tune(cfg: Config, trainer: Trainer, monitor: RunMonitor) -> StepResult:
    """Run the next step timed, search the order at its costs and log both (rank 0)."""
    model = trainer.model
    result, costs, bubble = tune_order(
        trainer.train_step, model.schedule, model.pipeline, trainer.device
    )
    if monitor.active:
        ms = ", ".join(
            f"s{s} {f * 1e3:.1f}/{i * 1e3:.1f}/{w * 1e3:.1f}"
            for s, (f, i, w) in enumerate(zip(costs.forward, costs.input_grad, costs.weight_grad))
        )
        monitor.progress.write(
            f"{model.pipeline.spec.name}: order searched at step {trainer.step}'s costs (F/I/W ms: {ms}); "
            f"predicted bubble {bubble:.3f} of the step, {bubble / (1 - bubble):.3f} of the ideal",
            with_eta=False,
        )
        order = model.schedule.pipeline_order  # type: ignore[union-attr]
        for rank in sorted(order):
            line = " ".join(f"{a.computation_type.value}{a.microbatch_index}" for a in order[rank])
            monitor.progress.write(f"  pp rank {rank}: {line}", with_eta=False)
    return result

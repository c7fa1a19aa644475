"""zbv, zb_1p and zb_2p without parallel.stage_costs: search their order at the costs measured on the
run's second step (the first infers shapes), log it with its predicted bubble, and run it from
the third step on (whose timeline, with parallel.timeline=true, shows it)."""

from __future__ import annotations

from launcher.config import Config
from launcher.run.monitor import RunMonitor
from launcher.run.trainer import StepResult, Trainer
from parallel.cost_tuning import tune_order
from parallel.schedules import schedule_spec

TUNE_AFTER = 2  # the run's second step: the first one infers shapes and allocates buffers


def searched_order_step(cfg: Config, trainer: Trainer) -> int | None:
    """The step whose measured costs the order is searched at, or None (not searched, or the
    costs are given)."""
    p = cfg.parallel
    if p.pp == 1 or not schedule_spec(p.schedule).searched or p.stage_costs is not None:
        return None
    return trainer.step + TUNE_AFTER


def tune(cfg: Config, trainer: Trainer, monitor: RunMonitor) -> StepResult:
    """Run the next step timed, search the order at its costs and log both (rank 0)."""
    p, model = cfg.parallel, trainer.model
    result, costs, bubble = tune_order(
        trainer.train_step,
        model.schedule,
        p.schedule,
        p.pp,
        model.n_stages,
        p.microbatches,
        trainer.device,
    )
    if monitor.active:
        ms = ", ".join(
            f"s{s} {f * 1e3:.1f}/{i * 1e3:.1f}/{w * 1e3:.1f}"
            for s, (f, i, w) in enumerate(zip(costs.forward, costs.input_grad, costs.weight_grad))
        )
        monitor.progress.write(
            f"{p.schedule}: order searched at step {trainer.step}'s costs (F/I/W ms: {ms}); "
            f"predicted bubble {bubble:.3f} of the step, {bubble / (1 - bubble):.3f} of the ideal",
            with_eta=False,
        )
        order = model.schedule.pipeline_order  # type: ignore[union-attr]
        for rank in sorted(order):
            line = " ".join(f"{a.computation_type.value}{a.microbatch_index}" for a in order[rank])
            monitor.progress.write(f"  pp rank {rank}: {line}", with_eta=False)
    return result

"""tridist-made zero-bubble action orders (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR
2024): one stage per rank the handcrafted ZB-H1 and ZB-H2 and the searched ZB-1p and ZB-2p, and
ZB-V on the V placement, as per-rank lists of torch _Actions (F, I = input gradient, W = weight
gradient) that torch's `_PipelineScheduleRuntime` runs, adding the sends and receives
(parallel/pipeline/runtime.py).

Written by hand: torch 2.13 has no one-stage-per-rank zero-bubble order and searches none from
costs. A microbatch counts against a rank's memory from its F to its W (torch frees the last of
its saved tensors there).
- zb_h1: the paper's pattern: rank r runs 1F1B's p-1-r warm-up forwards, then F, I and, r
  microbatches late, W: every rank holds p microbatches, 1F1B's first-stage peak.
- zb_h2: 2p-1 in flight, ordered by the list scheduler (parallel/pipeline/list_schedule.py) at the
  paper's costs F = I = W.
- zb_1p / zb_2p: searched at the run's costs under p / 2p: every ZB-H1-shaped order (more
  warm-up forwards, later weight gradients) and the list scheduler at every memory limit are
  replayed (parallel/pipeline/costs.py) and the shortest wins, so they never lose to zb_h1 / zb_h2.
- zbv: ZB-V's heuristic, the list scheduler on the V under the paper's 2p chunk-microbatches
  (1F1B's first-stage peak, p whole microbatches), at F = I = W: the shortest of its variants
  (I or F first when both can start; a pending W whenever the rank would idle, or only when it
  ends before the next F or I could start), and torch's handcrafted
  ZBV order kept as a candidate, so zbv never loses to it (torch's wins at p = 8, m = 16 or
  32, by 1 to 1.5 F; the list scheduler wins at m < 2p and ties elsewhere, at the floor).

Under torch's runtime every step ends on every rank before the optimizer runs, so the last rank
idles (p-1) F before its first input arrives, whatever the order: (p-1) F of bubble per rank is
the floor (the V's chunks are F/2: (p-1) F/2), which ZB-H1 and ZB-V already reach at F = I = W.
The papers' zero bubble for ZB-H2 and ZB-V also needs their optimizer post-validation, which lets
one step's warm-up fill the previous step's cool-down; torch's step() does not overlap steps.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import replace
from functools import lru_cache

from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops  # private API
from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    _Action,
)

from parallel.pipeline.costs import StageCosts
from parallel.pipeline.list_schedule import (
    VARIANTS,
    Order,
    list_schedule,
    peak_in_flight,
    step_time,
)

TIE_BREAK_P2P = 0.02  # of a mean stage forward: the transfer time ties are broken at


def h1_shaped(pp: int, microbatches: int, extra_warmup: int = 0, extra_lag: int = 0) -> Order:
    """ZB-H1's pattern: on rank r, p-1-r (+ extra) warm-up forwards, then F, I and the W of
    r (+ extra) microbatches before, the remaining W's last."""
    m, order = microbatches, {}
    for r in range(pp):
        warm = min(m, pp - 1 - r + extra_warmup)
        acts = [_Action(r, FORWARD, k) for k in range(warm)]
        n_f, n_w = warm, 0
        for k in range(m):
            if n_f < m:
                acts.append(_Action(r, FORWARD, n_f))
                n_f += 1
            acts.append(_Action(r, BACKWARD_INPUT, k))
            if k >= r + extra_lag:
                acts.append(_Action(r, BACKWARD_WEIGHT, n_w))
                n_w += 1
        order[r] = acts + [_Action(r, BACKWARD_WEIGHT, k) for k in range(n_w, m)]
    return order


@lru_cache(maxsize=64)
def searched_order(pp: int, microbatches: int, costs: StageCosts, limit: int) -> Order:
    """ZB-1p / ZB-2p: the shortest order at `costs` holding at most `limit` microbatches
    (cached: callers copy it)."""
    # a ZB-H1-shaped order holds p + warm + lag microbatches
    candidates = [
        h1_shaped(pp, microbatches, warm, lag)
        for warm, lag in itertools.product(range(limit - pp + 1), repeat=2)
        if warm + lag <= limit - pp
    ]
    candidates += [list_schedule(pp, microbatches, costs, k) for k in range(1, limit + 1)]
    fits = [o for o in candidates if max(peak_in_flight(o).values()) <= limit]
    return min(fits, key=lambda o: step_time(o, costs))  # h1_shaped(0, 0) always fits p


@lru_cache(maxsize=64)
def _at_equal_costs(kind: str, pp: int, microbatches: int) -> Order:
    if kind == "h1":
        return h1_shaped(pp, microbatches)
    return list_schedule(pp, microbatches, StageCosts.uniform(pp, pp), 2 * pp - 1)


def _copy(order: Order) -> Order:
    return {r: list(actions) for r, actions in order.items()}


def zb_h1_order(pp: int, n_stages: int, microbatches: int, costs: StageCosts | None) -> Order:
    """ZB-H1 (costs are ignored: the order is fixed)."""
    return _copy(_at_equal_costs("h1", pp, microbatches))


def zb_h2_order(pp: int, n_stages: int, microbatches: int, costs: StageCosts | None) -> Order:
    """ZB-H2 (costs are ignored: the order is the one for F = I = W)."""
    return _copy(_at_equal_costs("h2", pp, microbatches))


def zb_1p_order(pp: int, n_stages: int, microbatches: int, costs: StageCosts | None) -> Order:
    """ZB-1p: searched at `costs` (equal when None) under 1F1B's peak, p microbatches."""
    return _copy(searched_order(pp, microbatches, costs or StageCosts.uniform(pp, pp), pp))


def zb_2p_order(pp: int, n_stages: int, microbatches: int, costs: StageCosts | None) -> Order:
    """ZB-2p: searched at `costs` (equal when None) under twice 1F1B's peak, 2p microbatches."""
    return _copy(searched_order(pp, microbatches, costs or StageCosts.uniform(pp, pp), 2 * pp))


@lru_cache(maxsize=64)
def searched_v_order(pp: int, microbatches: int, costs: StageCosts) -> Order:
    """ZB-V: the shortest V order at `costs` holding at most 2p chunk-microbatches per rank, of
    torch's handcrafted ZB-V order and the list scheduler's (cached: callers copy it)."""
    limit = 2 * pp
    torch_ops = get_schedule_ops("ZBVZeroBubble", pp, microbatches, 2)
    candidates = [{r: [a for a in acts if a is not None] for r, acts in enumerate(torch_ops)}]
    # at F = I = W a smaller memory limit never gave a shorter order (p <= 8, m <= 32), and each
    # list schedule costs ~0.2 s at p = 8, m = 32: only the paper's limit is tried
    candidates += [
        list_schedule(pp, microbatches, costs, limit, True, fill, first) for first, fill in VARIANTS
    ]
    # of equally short orders, the one that loses least when each transfer takes a little time
    # (a real one does: ~1 ms here, FACTS.md); the list scheduler's lose more than torch's
    late = replace(costs, p2p=costs.p2p + TIE_BREAK_P2P * statistics.mean(costs.forward))
    return min(candidates, key=lambda o: (step_time(o, costs), step_time(o, late)))


def zbv_order(pp: int, n_stages: int, microbatches: int, costs: StageCosts | None) -> Order:
    """ZB-V: searched at `costs` (equal when None) under 2p chunk-microbatches, p microbatches."""
    uniform = StageCosts.uniform(2 * pp, pp)
    return _copy(searched_v_order(pp, microbatches, costs or uniform))

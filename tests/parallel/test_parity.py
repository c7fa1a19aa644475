"""Every schedule on several (dp, pp, tp, v) layouts gives the single-process losses and weights.

Cases sharing a world size run one after another inside one set of spawned gloo ranks.
"""

import pytest
import torch

from tests.run_training import train_and_report
from tests.spawn import run_ranks

# optim.eps=1e-5: Adam's first updates are ~lr*sign(g), so with eps=1e-8 an element whose
# gradient is ~1e-9 (pure rounding noise) moves by a full lr step in one layout and the other
# way in another. A slightly larger eps keeps such elements still; a wrong gradient anywhere
# still moves weights by ~lr and fails the 1e-5 check by orders of magnitude.
BASE = ["model=debug", "train.steps=3", "train.seq_len=16", "train.global_batch_size=32",
        "train.sample_tokens=0", "train.val_interval=1000", "optim.warmup_steps=1",
        "optim.eps=1e-5", "device=cpu"]
ONE_STAGE = ("gpipe", "1f1b")
MULTI_STAGE = ("interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv", "dualpipev")
LAYOUTS = {  # world size -> [(dp, pp, tp, v, schedules)]
    2: [(1, 2, 1, 1, ONE_STAGE), (1, 2, 1, 2, MULTI_STAGE)],
    4: [(1, 4, 1, 2, MULTI_STAGE)],
    8: [(2, 2, 2, 1, ONE_STAGE), (2, 2, 2, 2, MULTI_STAGE), (1, 2, 4, 1, ONE_STAGE),
        (4, 2, 1, 1, ONE_STAGE), (1, 4, 2, 2, MULTI_STAGE)],
}


def _overrides(dp: int, pp: int, tp: int, v: int, schedule: str) -> list[str]:
    return BASE + [f"parallel.dp={dp}", f"parallel.pp={pp}", f"parallel.tp={tp}",
                   f"parallel.virtual_stages={v}", f"parallel.schedule={schedule}", "parallel.microbatches=8"]


def _run_cases(cases: list[list[str]], world: int) -> list[tuple[list[float], dict[str, torch.Tensor]]]:
    return [train_and_report(overrides, world) for overrides in cases]


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    return train_and_report(BASE, 1)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_schedules_and_layouts_match_single_process(world: int, reference) -> None:
    ref_losses, ref_weights = reference
    cases = [(dp, pp, tp, v, s) for dp, pp, tp, v, schedules in LAYOUTS[world] for s in schedules]
    per_rank = run_ranks(world, _run_cases, [_overrides(*c) for c in cases], world)
    for i, case in enumerate(cases):
        weights: dict[str, torch.Tensor] = {}
        for rank_results in per_rank:
            losses, rank_weights = rank_results[i]
            rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
            assert len(losses) == 3 and rel <= 1e-5, (case, losses, ref_losses)
            weights.update(rank_weights)
        assert weights.keys() == ref_weights.keys(), case  # no layer dropped or duplicated
        worst = max(ref_weights, key=lambda k: _relative(weights[k], ref_weights[k]))
        assert _relative(weights[worst], ref_weights[worst]) <= 1e-5, (case, worst)

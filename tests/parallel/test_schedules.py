"""The schedule registry: every reader (config validation, the pipeline builder, the planner's
search, the benchmark, the timeline) covers exactly its names, and its formulas give the values
the code gave before it was one registry. A new schedule adds one row to PARITY."""

from __future__ import annotations

import inspect
import math
import re

import pytest
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from launcher.benchmarks.pipeline import (
    VIRTUAL_STAGES,
    benchmarked_stages_per_rank,
    formula_bubble,
    pipeline,
)
from launcher.config import ConfigError
from launcher.plan import schedule_candidates
from launcher.run.compose import compose_config
from parallel.plan.simulate import simulated_bubble
from parallel.schedules import (
    SCHEDULE_SPECS,
    SCHEDULES,
    bubble_fraction,
    bubble_over_ideal,
    microbatches_in_flight,
    n_pipeline_stages,
    schedule_spec,
    stage_ids_for_rank,
    stages_per_rank,
)
from parallel.timeline import TimelineInfo

P, M, V = 4, 8, 2
# schedule -> (bubble fraction at p=4, m=8, v=2; microbatches in flight per pp rank there;
# torch's order replayed at p=4, m=8), as the code before the registry computed them
PARITY = {
    "gpipe": (3 / 11, [8, 8, 8, 8], 3 / 11),
    "1f1b": (3 / 11, [4, 3, 2, 1], 3 / 11),
    "interleaved_1f1b": (3 / 19, [5.5, 4.5, 3.5, 2.5], 3 / 19),
    "looped_bfs": (3 / 19, [8, 8, 8, 8], 3 / 19),
    "interleaved_zb": (1 / 17, [4, 4, 4, 4], 1 / 17),
    # tridist's ZB-V order and torch's reach the floor of a synchronous step, (p-1) chunks of F/2
    "zbv": (1 / 17, [4, 4, 4, 4], 1 / 17),
    "zbv_torch": (1 / 17, [4, 4, 4, 4], 1 / 17),
    "dualpipev": (1 / 9, [5, 5, 5, 5], 1 / 9),
    # one stage per rank: the last rank's (p-1) F wait for its first input, any order
    "zb_h1": (1 / 9, [4, 4, 4, 4], 1 / 9),
    "zb_h2": (1 / 9, [7, 7, 7, 7], 1 / 9),
    "zb_1p": (1 / 9, [4, 4, 4, 4], 1 / 9),
    "zb_2p": (1 / 9, [8, 8, 8, 8], 1 / 9),
}


def test_every_schedule_has_a_parity_row() -> None:
    assert tuple(PARITY) == SCHEDULES == tuple(SCHEDULE_SPECS)
    assert all(name == spec.name for name, spec in SCHEDULE_SPECS.items())


def test_config_validation_accepts_exactly_the_registry() -> None:
    for name in SCHEDULES:
        v = stages_per_rank(name, V)
        cfg = compose_config(
            [
                "model=debug",
                "parallel.pp=2",
                f"parallel.schedule={name}",
                f"parallel.virtual_stages={v}",
                "parallel.microbatches=4",
            ],
            2,
        )
        assert cfg.parallel.schedule == name
    with pytest.raises(ConfigError, match="parallel.schedule") as err:
        compose_config(["parallel.pp=2", "parallel.schedule=pipedream"], 2)
    listed = re.search(r"choose one of (.*)$", str(err.value)).group(1)
    assert tuple(listed.split(", ")) == SCHEDULES


@pytest.mark.parametrize(
    ("name", "pp", "v", "m", "setting", "fix"),
    [
        (
            "1f1b",
            2,
            2,
            4,
            "virtual_stages",
            "1f1b runs one stage per rank; set virtual_stages=1 or use interleaved_1f1b",
        ),
        ("zbv", 2, 1, 4, "virtual_stages", "zbv places exactly two stages per rank; set it to 2"),
        (
            "dualpipev",
            2,
            2,
            3,
            "microbatches",
            "dualpipev needs at least as many microbatches as stages (4)",
        ),
        (
            "interleaved_zb",
            4,
            2,
            9,
            "microbatches",
            "interleaved_zb runs microbatches in rounds of pp=4; use a multiple of 4, e.g. 8",
        ),
    ],
)
def test_validity_checks_name_the_setting_and_the_fix(
    name: str, pp: int, v: int, m: int, setting: str, fix: str
) -> None:
    problem = schedule_spec(name).problem(pp, v, m)
    assert (problem.setting, problem.value, problem.fix) == (
        setting,
        v if setting == "virtual_stages" else m,
        fix,
    )
    assert schedule_spec(name).problem(pp, stages_per_rank(name, v), 2 * pp * V) is None


def test_the_builder_resolves_every_torch_class() -> None:
    for spec in SCHEDULE_SPECS.values():
        if spec.order is not None:  # tridist's order, run by torch's _PipelineScheduleRuntime
            assert spec.torch_class is None, spec.name
            assert spec.stages_per_rank == (2 if spec.placement == "v" else 1), spec.name
            continue
        cls = get_schedule_class(spec.torch_class)
        # torch's single-stage classes are exactly the schedules with one stage per rank
        assert issubclass(cls, PipelineScheduleSingle) == (spec.stages_per_rank == 1), spec.name


def test_placement_and_stage_counts() -> None:
    for name in SCHEDULES:
        v = stages_per_rank(name, 3)
        n = n_pipeline_stages(P, 3, name)
        assert n == P * v and n_pipeline_stages(1, 3, name) == 1
        held = sorted(s for r in range(P) for s in stage_ids_for_rank(r, P, 3, name))
        assert held == list(range(n)), name  # every stage on exactly one rank
    assert stage_ids_for_rank(1, P, 2, "dualpipev") == [1, 2 * P - 2]
    assert stage_ids_for_rank(1, P, 2, "looped_bfs") == [1, 1 + P]


def test_the_planner_searches_every_schedule() -> None:
    pairs = schedule_candidates(P)
    assert {name for name, _ in pairs} == set(SCHEDULES)
    for name, v in pairs:  # each pair is a layout the registry accepts
        assert schedule_spec(name).problem(P, v, 2 * P * v) is None, (name, v)


def test_the_benchmark_and_the_timeline_cover_every_schedule() -> None:
    assert inspect.signature(pipeline).parameters["schedules"].default == SCHEDULES
    for name in SCHEDULES:
        v = benchmarked_stages_per_rank(name)
        assert v == stages_per_rank(name, VIRTUAL_STAGES)
        assert formula_bubble(name, P, M) == bubble_fraction(name, P, M, v)
        info = TimelineInfo(name, P, M, v, step=1)
        assert info.formula == bubble_fraction(name, P, M, v)


@pytest.mark.parametrize("name", SCHEDULES)
def test_formulas_give_the_values_of_before(name: str) -> None:
    fraction, in_flight, simulated = PARITY[name]
    assert bubble_fraction(name, P, M, V) == pytest.approx(fraction, abs=1e-15)
    over = bubble_over_ideal(name, P, M, V)
    assert math.isclose(over / (1 + over), fraction, abs_tol=1e-15)  # the two conventions agree
    assert [microbatches_in_flight(name, P, r, M, V) for r in range(P)] == in_flight
    assert simulated_bubble(name, P, M, V) == pytest.approx(simulated, abs=1e-12)
    assert bubble_fraction(name, 1, M, V) == 0 and microbatches_in_flight(name, 1, 0, M, V) == 1


def test_microbatches_in_flight_follow_the_schedules() -> None:
    p, m = 4, 16
    assert [microbatches_in_flight("gpipe", p, r, m, 1) for r in range(p)] == [m] * p
    assert [microbatches_in_flight("1f1b", p, r, m, 1) for r in range(p)] == [4, 3, 2, 1]
    # Megatron: rank 0 warms up 2(p-1) + (v-1)p chunks, then holds one more; chunks are 1/v
    assert microbatches_in_flight("interleaved_1f1b", p, 0, m, 2) == (2 * 3 + 4 + 1) / 2
    assert microbatches_in_flight("zbv", p, 3, m, 2) == p
    assert microbatches_in_flight("1f1b", p, 0, 2, 1) == 2  # never more than there are
    assert microbatches_in_flight("1f1b", 1, 0, m, 1) == 1


def test_named_values_of_before() -> None:
    assert bubble_fraction("1f1b", 4, 8) == 3 / 11
    assert bubble_fraction("interleaved_1f1b", 4, 16, 4) == pytest.approx(3 / 67)
    assert bubble_over_ideal("dualpipev", 8, 32, 2) == 7 / 96
    assert bubble_over_ideal("interleaved_zb", 8, 32, 2) == pytest.approx(7 / 192)
    assert microbatches_in_flight("interleaved_1f1b", 4, 0, 2, 2) == 2  # never more than there are
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'; choose one of gpipe, 1f1b"):
        bubble_fraction("pipedream", 4, 8)

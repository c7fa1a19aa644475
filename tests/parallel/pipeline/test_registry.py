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
from parallel.pipeline.registry import (
    SCHEDULE_SPECS,
    SCHEDULES,
    pipeline_layout,
    schedule_spec,
)
from parallel.pipeline.simulate import simulated_bubble
from parallel.pipeline.timeline import TimelineInfo

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
        v = pipeline_layout(name, 2, V).stages_per_rank
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
    assert (
        schedule_spec(name).problem(pp, pipeline_layout(name, 2, v).stages_per_rank, 2 * pp * V)
        is None
    )


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
        v = pipeline_layout(name, 2, 3).stages_per_rank
        n = pipeline_layout(name, P, 3).n_stages
        assert n == P * v and pipeline_layout(name, 1, 3).n_stages == 1
        held = sorted(s for r in range(P) for s in pipeline_layout(name, P, 3).stage_ids(r))
        assert held == list(range(n)), name  # every stage on exactly one rank
    assert pipeline_layout("dualpipev", P, 2).stage_ids(1) == [1, 2 * P - 2]
    assert pipeline_layout("looped_bfs", P, 2).stage_ids(1) == [1, 1 + P]


def test_the_planner_searches_every_schedule() -> None:
    pairs = schedule_candidates(P)
    assert {name for name, _ in pairs} == set(SCHEDULES)
    for name, v in pairs:  # each pair is a layout the registry accepts
        assert schedule_spec(name).problem(P, v, 2 * P * v) is None, (name, v)


def test_the_benchmark_and_the_timeline_cover_every_schedule() -> None:
    assert inspect.signature(pipeline).parameters["schedules"].default == SCHEDULES
    for name in SCHEDULES:
        v = benchmarked_stages_per_rank(name)
        assert v == pipeline_layout(name, 2, VIRTUAL_STAGES).stages_per_rank
        assert formula_bubble(name, P, M) == pipeline_layout(name, P, v, M).bubble_fraction
        info = TimelineInfo(pipeline_layout(name, P, v, M), step=1)
        assert info.formula == pipeline_layout(name, P, v, M).bubble_fraction


@pytest.mark.parametrize("name", SCHEDULES)
def test_formulas_give_the_values_of_before(name: str) -> None:
    fraction, in_flight, simulated = PARITY[name]
    assert pipeline_layout(name, P, V, M).bubble_fraction == pytest.approx(fraction, abs=1e-15)
    over = pipeline_layout(name, P, V, M).bubble_over_ideal
    assert math.isclose(over / (1 + over), fraction, abs_tol=1e-15)  # the two conventions agree
    assert [pipeline_layout(name, P, V, M).in_flight(r) for r in range(P)] == in_flight
    assert simulated_bubble(pipeline_layout(name, P, V, M)) == pytest.approx(simulated, abs=1e-12)
    assert (
        pipeline_layout(name, 1, V, M).bubble_fraction == 0
        and pipeline_layout(name, 1, V, M).in_flight(0) == 1
    )


def test_microbatches_in_flight_follow_the_schedules() -> None:
    p, m = 4, 16
    assert [pipeline_layout("gpipe", p, 1, m).in_flight(r) for r in range(p)] == [m] * p
    assert [pipeline_layout("1f1b", p, 1, m).in_flight(r) for r in range(p)] == [4, 3, 2, 1]
    # Megatron: rank 0 warms up 2(p-1) + (v-1)p chunks, then holds one more; chunks are 1/v
    assert pipeline_layout("interleaved_1f1b", p, 2, m).in_flight(0) == (2 * 3 + 4 + 1) / 2
    assert pipeline_layout("zbv", p, 2, m).in_flight(3) == p
    assert pipeline_layout("1f1b", p, 1, 2).in_flight(0) == 2  # never more than there are
    assert pipeline_layout("1f1b", 1, 1, m).in_flight(0) == 1


def test_named_values_of_before() -> None:
    assert pipeline_layout("1f1b", 4, 1, 8).bubble_fraction == 3 / 11
    assert pipeline_layout("interleaved_1f1b", 4, 4, 16).bubble_fraction == pytest.approx(3 / 67)
    assert pipeline_layout("dualpipev", 8, 2, 32).bubble_over_ideal == 7 / 96
    assert pipeline_layout("interleaved_zb", 8, 2, 32).bubble_over_ideal == pytest.approx(7 / 192)
    assert (
        pipeline_layout("interleaved_1f1b", 4, 2, 2).in_flight(0) == 2
    )  # never more than there are
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'; choose one of gpipe, 1f1b"):
        pipeline_layout("pipedream", 4, 1, 8)

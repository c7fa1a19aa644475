"""launcher.plan: exact per-rank parameters and the activation and TP estimates against a real
CPU run, the papers' bubbles, published and impossible layouts, the layout search, and what the
printout says (plurals, column legends, DP exposed vs hidden, zero-bubble memory flagged)."""

from __future__ import annotations

import re
import time

import pytest
import torch

from launcher.plan import estimate_config, main, search, search_report
from launcher.run.compose import compose_config
from launcher.validate import validate
from parallel.plan.comm import tp_collectives
from parallel.plan.estimate import GIB, PlanEstimate
from parallel.plan.params import StageCounter
from tests.helpers.spawn import run_ranks
from tests.parallel.plan.test_memory import live_activation_bytes

REAL = [
    "model=debug",
    "train.seq_len=32",
    "train.sample_tokens=0",
    "device=cpu",
    "parallel.pp=2",
    "parallel.tp=2",
    "train.global_batch_size=8",
    "parallel.microbatches=4",
]
SCHEDULES = {"zbv": 2, "1f1b": 1, "interleaved_1f1b": 2}  # schedule -> virtual stages
CLUSTER_OF_4 = ["cluster.nodes=1", "cluster.gpus_per_node=4"]


def _layout(schedule: str) -> list[str]:
    return [f"parallel.schedule={schedule}", f"parallel.virtual_stages={SCHEDULES[schedule]}"]


def _count_collectives() -> torch.utils._python_dispatch.TorchDispatchMode:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        """TP collectives issued from module hooks (DTensor redistributions), by op name."""

        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            self.n += any(k in name for k in ("all_reduce", "all_gather", "reduce_scatter"))
            return func(*args, **(kwargs or {}))

    return Count()


def _real_run(world: int) -> dict[str, object]:
    """On each of 4 gloo ranks (dp=1, pp=2, tp=2): parameters held, microbatches in flight and
    TP collectives per step, and the activation bytes a forward of the first chunk keeps."""
    from launcher.benchmarks.activation_memory import SavedActivationTracker
    from launcher.run.build import build_trainer, load_data
    from tests.helpers.run_training import make_config

    out: dict[str, object] = {}
    for schedule in SCHEDULES:
        cfg = make_config(REAL + _layout(schedule), world)
        trainer = build_trainer(cfg, load_data(cfg))
        if schedule == "zbv":  # the V places both ends on rank 0: parameters only
            out["params"] = sum(
                (p.to_local() if hasattr(p, "to_local") else p).numel()
                for p in trainer.model.parameters()
            )
            continue
        trainer.train_step()  # the first step also infers shapes; measure the second
        inputs, targets = trainer.sampler.next_batch()
        with SavedActivationTracker() as saved, _count_collectives() as comm:
            trainer.forward_backward(inputs, targets)
        out[schedule] = (saved.peak / (saved.total / cfg.parallel.microbatches), comm.n)
        chunk = trainer.model.chunks[0]
        if schedule == "1f1b" and trainer.model.has_first_stage:
            for n in (cfg.train.seq_len, cfg.model.max_seq_len):  # rope tables exist before
                chunk.rope(n, inputs.device)
            tables = [t for pair in chunk._rope_cache.values() for t in pair]
            local = [p.to_local() if hasattr(p, "to_local") else p for p in chunk.parameters()]
            micro = inputs[: inputs.shape[0] // cfg.parallel.microbatches]
            out["forward_bytes"] = live_activation_bytes(
                lambda c=chunk, x=micro: c(x), local + tables
            )[0]
    return out


def _plan(overrides: list[str], world: int | None = None) -> PlanEstimate:
    cfg = compose_config(overrides)
    validate(cfg, world or cfg.cluster.nodes * cfg.cluster.gpus_per_node, cfg.cluster.gpus_per_node)
    return estimate_config(cfg, StageCounter(cfg.model))


@pytest.fixture(scope="module")
def real() -> list[dict[str, object]]:
    return run_ranks(4, _real_run, 4)


def test_per_rank_parameters_equal_the_real_run_exactly(real: list[dict[str, object]]) -> None:
    plan = _plan(REAL + _layout("zbv") + CLUSTER_OF_4)
    assert plan.ranks[0].stage_ids == [0, 3]  # embedding and head both on pp rank 0
    for rank, got in enumerate(real):
        assert got["params"] == plan.ranks[rank // 2].params, (rank, got["params"])  # tp innermost


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_microbatches_in_flight_and_tp_collectives_match_the_real_run(
    real: list[dict[str, object]], schedule: str
) -> None:
    plan = _plan(REAL + _layout(schedule) + CLUSTER_OF_4)
    for rank, got in enumerate(real):
        in_flight, collectives = got[schedule]
        r = plan.ranks[rank // 2]
        assert abs(r.in_flight - in_flight) <= 0.2 * in_flight, (
            schedule,
            rank,
            r.in_flight,
            in_flight,
        )
        ends = (0 in r.stage_ids) + (2 * SCHEDULES[schedule] - 1 in r.stage_ids)  # embedding, head
        # the loss's token-sized all-reduces run inside DTensor's dispatch: not counted here
        assert collectives == 4 * tp_collectives(
            sequence_parallel=False, layers=r.layers, ends=ends, recompute="none"
        ), (schedule, rank, collectives)


def test_tensor_parallel_activation_estimate_matches_the_real_run(
    real: list[dict[str, object]],
) -> None:
    from parallel.plan.layout import RankContext
    from parallel.plan.memory import activation_bytes

    cfg = compose_config(REAL)
    for rank in (0, 1):  # pp rank 0: the embedding and 4 blocks, sharded over tp=2
        measured = real[rank]["forward_bytes"]
        first = RankContext(args=cfg.model, layers=4, tokens=2 * 32, n_stages=2, tp=2)
        estimate_ = activation_bytes(first, in_flight=1, dtype_bytes=4)
        assert abs(estimate_ - measured) <= 0.2 * measured, (rank, estimate_, measured)


@pytest.mark.parametrize(
    ("schedule", "v"),
    [
        ("gpipe", 1),
        ("1f1b", 1),
        ("interleaved_1f1b", 2),
        ("interleaved_1f1b", 4),
        ("interleaved_zb", 2),
        ("zbv", 2),
        ("dualpipev", 2),
        ("zb_h1", 1),
        ("zb_h2", 1),
        ("zb_2p", 1),
    ],
)
def test_bubble_is_the_papers(schedule: str, v: int) -> None:
    p, m = 4, 8
    plan = _plan(
        [
            "model=debug",
            "model.n_layers=16",
            "cluster.nodes=1",
            "cluster.gpus_per_node=4",
            f"parallel.pp={p}",
            f"parallel.schedule={schedule}",
            f"parallel.virtual_stages={v}",
            f"parallel.microbatches={m}",
            "train.global_batch_size=8",
        ]
    )
    # per chunk of a rank holding v: forward F = 1/v, input gradient B = 1/v, weight gradient
    # W = 1/v; the ideal step is m (F + B + W) v = 3m
    f = b = w = 1 / v
    papers = {
        "gpipe": (p - 1) / (m + p - 1),  # GPipe, as a fraction of the step
        "1f1b": (p - 1) / (m + p - 1),  # PipeDream-Flush: the same bubble
        "interleaved_1f1b": None,  # Megatron: (p-1)/(v m) of the ideal step
        "interleaved_zb": None,  # ZB-H1: (p-1)(F + B - W)
        # ZB-V's paper: none once m >= 2p, with optimizer post-validation; in one synchronous
        # step the middle rank waits (p-1) chunk forwards for its first input
        "zbv": None,
        "dualpipev": None,  # DeepSeek-V3: (p-1)(F&B + B_full - 3W), F&B = F + B_full unoverlapped
        "zb_h1": None,  # ZB-H1: (p-1)(F + B - W)
        "zb_h2": None,  # ZB-H2 / ZB-2p: the synchronous step's floor, (p-1) F
        "zb_2p": None,
    }
    over_ideal = {
        "interleaved_1f1b": (p - 1) / (v * m),
        "interleaved_zb": (p - 1) * (f + b - w) / (3 * m),
        "dualpipev": (p - 1) * ((f + 2 * b) + 2 * b - 3 * w) / (3 * m),
        "zbv": (p - 1) * f / (3 * m),
        "zb_h1": (p - 1) * (f + b - w) / (3 * m),
        "zb_h2": (p - 1) * f / (3 * m),
        "zb_2p": (p - 1) * f / (3 * m),
    }
    expected = (
        papers[schedule]
        if papers[schedule] is not None
        else over_ideal[schedule] / (1 + over_ideal[schedule])
    )
    assert plan.bubble == pytest.approx(expected), (schedule, v)


LLAMA3_405B = [
    "model=llama3_405b",
    "parallel.tp=8",
    "parallel.pp=16",
    "parallel.dp=128",
    "cluster.nodes=2048",
    "cluster.gpus_per_node=8",
    "cluster.gpu_mem_gib=80",
    "train.seq_len=8192",
    "train.global_batch_size=2048",
    "parallel.microbatches=16",
    "model.activation_checkpointing=full",
]


def test_llama3_405b_published_layout_fits(capsys: pytest.CaptureFixture[str]) -> None:
    # Llama 3: TP 8 x PP 16 x DP 128 on 16,384 80 GB GPUs, 8K sequences, 16M-token batches
    start = time.perf_counter()
    assert main(LLAMA3_405B) == 0
    took = time.perf_counter() - start
    out = capsys.readouterr().out
    assert re.search(r"^fits: pp rank \d+ is the fullest at [\d.]+ GiB of 80.0 GiB", out, re.M), out
    assert len(re.findall(r"^ +\d+ +\d+ +\d+ ", out, re.M)) == 16, out  # one row per pipeline rank
    plan = _plan(LLAMA3_405B)
    whole = StageCounter(compose_config(LLAMA3_405B).model).whole(tp=8)
    assert sum(r.params for r in plan.ranks) == whole.total  # the 16 stages hold the whole TP shard
    assert 0 < plan.mfu < 1 and 0 < plan.bubble < 1
    assert took < 60, took


def test_llama3_405b_on_one_node_without_sharding_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert (
        main(["model=llama3_405b", "cluster.nodes=1", "parallel.dp=8", "parallel.dp_shard=false"])
        == 2
    )
    out = capsys.readouterr().out
    found = re.search(
        r"does not fit: pp rank 0 needs ([\d.]+) GiB of 80.0 GiB \(short by ([\d.]+) GiB\)", out
    )
    assert found, out
    needs, short = float(found.group(1)), float(found.group(2))
    assert needs - 80 == pytest.approx(short, abs=0.11)
    assert needs * GIB > 16 * 405e9  # bf16 weights + fp32 gradients + Adam, unsharded


def test_invalid_layout_is_refused_with_the_validator_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert (
        main(
            [
                "model=debug",
                "parallel.tp=3",
                "parallel.dp=1",
                "cluster.nodes=1",
                "cluster.gpus_per_node=3",
            ]
        )
        == 2
    )
    assert (
        "config error: model.n_heads=8: must be divisible by parallel.tp=3"
        in capsys.readouterr().err
    )


def test_search_ranks_valid_fitting_layouts_for_8b_on_one_node() -> None:
    cfg = compose_config(
        ["model=llama3_8b", "cluster.nodes=1", "train.seq_len=8192", "train.global_batch_size=32"]
    )
    start = time.process_time()
    rows, valid = search(cfg, 10)
    took = time.process_time() - start  # CPU time: the machine is shared, wall time is noise
    assert took < 30, took
    assert len(rows) == 10 and valid > len(rows)
    speeds = [p.tokens_per_s for _, p in rows]
    assert speeds == sorted(speeds, reverse=True)
    for c, p in rows:
        validate(c, 8, 8)
        assert p.fits and p.gpus == 8
    assert {c.parallel.tp for c, _ in rows} | {c.parallel.pp for c, _ in rows} != {
        1
    }  # not all one layout
    text = search_report(cfg, rows[:3], valid, took)
    assert len(re.findall(r"^ +[123] +\d+ +\d+ +\d+ ", text, re.M)) == 3, text


def test_search_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            ["--search", "--top", "3", "model=debug", "cluster.nodes=1", "cluster.gpus_per_node=4"]
        )
        == 0
    )
    captured = capsys.readouterr()
    out = captured.out
    assert "valid layouts" in out and len(re.findall(r"^ +[123] ", out, re.M)) == 3, out
    # the columns are explained under the table; the search said it was working
    for legend in ("m: microbatches per step", "mbs: sequences per microbatch", "sp: sequence"):
        assert legend in out, out
    assert re.search(r"^search: estimated 1 of [\d,]+ valid layouts$", captured.err, re.M), (
        captured.err
    )


EIGHT_B = ["model=llama3_8b", "cluster.nodes=1", "train.seq_len=8192", "train.global_batch_size=32"]
ZERO_BUBBLE = EIGHT_B + [
    "parallel.tp=1",
    "parallel.pp=2",
    "parallel.dp=4",
    "parallel.schedule=interleaved_zb",
    "parallel.virtual_stages=4",
    "parallel.microbatches=8",
    "model.activation_checkpointing=selective",
]


def test_zero_bubble_activations_are_counted_as_torch_holds_them() -> None:
    # measured: torch frees a zero-bubble microbatch at its weight gradient, and its
    # interleaved ZB-H1 order holds p microbatches on every rank (test_activation_memory)
    zb = _plan(ZERO_BUBBLE)
    megatron = _plan(ZERO_BUBBLE + ["parallel.schedule=interleaved_1f1b"])
    assert [r.in_flight for r in zb.ranks] == [2, 2]
    assert [r.in_flight for r in megatron.ranks] == [2.25, 1.75]  # (2(p-r-1) + (v-1)p + 1) / v
    assert zb.ranks[0].activations < megatron.ranks[0].activations
    assert zb.ranks[1].activations > megatron.ranks[1].activations
    assert zb.fits and megatron.fits


def test_the_report_pluralizes_and_says_what_dp_exposes(capsys: pytest.CaptureFixture[str]) -> None:
    # replicated DP of a tiny model on 2 GPUs: its all-reduce outlasts the compute it hides behind
    overrides = ["model=debug", "cluster.nodes=1", "cluster.gpus_per_node=2", "parallel.dp=2"]
    assert main(overrides + ["train.global_batch_size=2", "parallel.dp_shard=false"]) == 0
    out = capsys.readouterr().out
    assert "1 microbatches" not in out and "1 sequences" not in out and "(s)" not in out, out
    assert "on 1 node x 2 GPUs" in out and "1 microbatch of 1 sequence x 128 tokens" in out, out
    assert "in flight: microbatches whose activations it holds at its peak" in out, out
    assert "mostly hidden" not in out, out
    found = re.search(
        r"^step: ([\d.e-]+) s = ([\d.e-]+) s on pp rank 0 .* \+ ([\d.e-]+) s exposed DP;", out, re.M
    )
    dp = re.search(
        r"^DP: ([\d.e-]+) s of traffic per step \(pp rank 0\), ([\d.e-]+) s of it hidden behind "
        r"compute, ([\d.e-]+) s exposed$",
        out,
        re.M,
    )
    assert found and dp, out
    step, pipeline, exposed = map(float, found.groups())
    traffic, hidden, dp_exposed = map(float, dp.groups())
    assert exposed == dp_exposed > hidden > 0 and step == pytest.approx(
        pipeline + exposed, rel=0.01
    )
    assert traffic == pytest.approx(hidden + exposed, rel=0.01)


QWEN3_MOE_30B_EP8 = [
    "model=qwen3_moe_30b_a3b",
    "parallel.ep=8",
    "parallel.dp=8",
    "cluster.nodes=1",
    "train.seq_len=4096",
    "train.global_batch_size=8",
    "model.activation_checkpointing=full",
]


def test_moe_plan_prints_expert_parallel_traffic(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(QWEN3_MOE_30B_EP8) == 0
    out = capsys.readouterr().out
    assert "(30.53B parameters, 3.35B active)" in out, out
    assert "ep=8 over dp x cp" in out and "16 of 128 routed experts per GPU" in out, out
    # one 4096-token sequence per GPU, 8 rows of 2048 per token, 7/8 sent, in bf16: 6 all-to-alls
    # (recompute repeats the forward's two) in each of 48 layers
    a2a = 4096 * 8 * 7 / 8 * 2048 * 2 * 6 * 48
    assert f"EP {a2a / 1e9:.2f} GB (all-to-all)" in out, out
    assert "no gradient all-reduce (ep = dp x cp)" in out, out
    assert "TP+PP+EP" in out, out
    plan = _plan(QWEN3_MOE_30B_EP8)
    assert plan.ranks[0].ep_bytes == a2a


def test_moe_search_tries_expert_parallel_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    overrides = ["model=qwen3_moe_debug", "cluster.nodes=1", "cluster.gpus_per_node=4"]
    from launcher.plan import candidates

    tried = {
        (c.parallel.dp * c.parallel.cp, c.parallel.ep)
        for c in candidates(compose_config(overrides))
    }
    assert {ep for _, ep in tried} == {1, 2, 4}
    assert all(dp_cp % ep == 0 for dp_cp, ep in tried)
    assert main(["--search", "--top", "3", *overrides]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ +# +tp +cp +pp +dp +rep +ep +schedule ", out, re.M), out
    assert "ep: expert parallel" in out, out

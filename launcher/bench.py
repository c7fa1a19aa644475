"""`python -m launcher.bench {overhead,pipeline,memory,checkpoint,split,cp,ab,moe}`: measure what
tridist adds, pipeline bubbles and memory, checkpoint I/O, the pipeline split, context
parallelism and any lever.

overhead: tridist's real training step against a bare PyTorch loop of the same model, data,
optimizer and schedule, interleaved in one process so machine noise hits both alike.
pipeline: every schedule on real gloo ranks whose stages sleep a fixed time, so the measured
bubble can be compared, even on 2 cores, with the literature's formula and with torch's own
action order for the schedule replayed at the same costs.
memory: the microbatches' activations each schedule holds per rank, measured on real ranks,
beside the count the planner uses.
checkpoint: checkpoint save/load against raw disk I/O of the same bytes.
split: the training step with the cost model's pipeline split against the even split, A/B
alternating on the same ranks, with the ratio the cost model predicts.
cp: activation memory per rank at several cp for one long sequence, and tokens/s at cp=1 vs cp=2
(both cp_comm variants) on 2 ranks, timed in alternation.
ab: two configs' training steps on the same ranks, timed in alternation (e.g. compile on/off).
moe: a MoE run under expert parallelism: all-to-all bytes measured against the plan, and the
expert load step by step.
Results: BENCHMARKS.md; the benchmarks themselves: launcher/benchmarks/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.benchmarks.ab import ab_benchmark, format_ab
from launcher.benchmarks.checkpoint import checkpoint_io, drop_page_cache, format_checkpoint_io
from launcher.benchmarks.context_parallel import cp_memory, cp_speed, format_cp
from launcher.benchmarks.machine import machine
from launcher.benchmarks.moe import format_moe, moe_run
from launcher.benchmarks.overhead import format_overhead, overhead
from launcher.benchmarks.pipeline import format_pipeline, pipeline
from launcher.benchmarks.schedule_memory import format_schedule_memory, schedule_memory
from launcher.benchmarks.split import HEAD_HEAVY, format_split, split_benchmark
from parallel.pipeline.registry import SCHEDULES

# 320M parameters: a 1.28 GB model in fp32, 3.8 GB with AdamW's two moments
CHECKPOINT_MODEL = ["model=llama3_1b", "model.n_layers=4", "model.vocab_size=32000"]


def main(argv: list[str] | None = None) -> None:
    """Parse the subcommand and print its table."""
    parser = argparse.ArgumentParser(prog="python -m launcher.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    o = sub.add_parser("overhead", help="tridist's training step vs a bare PyTorch loop")
    o.add_argument("--steps", type=int, default=30, help="timed steps per side")
    o.add_argument("--warmup", type=int, default=3)
    o.add_argument("--model", default="tiny")
    o.add_argument("--seq-len", type=int, default=256)
    o.add_argument("--batch", type=int, default=8)
    o.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for tridist's side only (e.g. train.compile=true, precision=bf16); "
        "model.* overrides apply to both sides",
    )
    p = sub.add_parser("pipeline", help="bubble of each schedule with fixed-cost stages")
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--stage-ms", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--w-ratio", type=float, default=1.0, help="weight gradient / forward")
    p.add_argument("--last-stage", type=float, default=1.0, help="the last stage's cost factor")
    mem = sub.add_parser("memory", help="activations each schedule holds, measured vs counted")
    mem.add_argument("--pp", type=int, default=2)
    mem.add_argument("--microbatches", type=int, default=8)
    mem.add_argument("--schedules", default=",".join(SCHEDULES))
    c = sub.add_parser("checkpoint", help="checkpoint save/load vs raw disk I/O (>= 1 GB)")
    c.add_argument(
        "--dir",
        type=Path,
        default=Path("bench-checkpoint"),
        help="scratch folder on the disk to measure (deleted afterwards)",
    )
    c.add_argument("--model", nargs="*", default=CHECKPOINT_MODEL, help="model overrides")
    c.add_argument("--tp", type=int, default=2, help="layout the resharded load uses")
    s = sub.add_parser("split", help="auto vs even pipeline split, real training steps")
    s.add_argument("--model", nargs="*", default=HEAD_HEAVY, help="model overrides")
    s.add_argument("--pp", type=int, default=4)
    s.add_argument("--steps", type=int, default=3, help="steps per timed block")
    s.add_argument("--blocks", type=int, default=4, help="timed blocks per split, alternating")
    cp = sub.add_parser("cp", help="context parallelism: activation memory and tokens/s")
    cp.add_argument("--model", default="tiny")
    cp.add_argument("--seq-len", type=int, default=4096, help="sequence of the memory table")
    cp.add_argument("--sizes", default="1,2,4", help="cp sizes of the memory table")
    cp.add_argument("--speed-seq-len", type=int, default=2048)
    cp.add_argument("--steps", type=int, default=2, help="timed steps per layout and round")
    cp.add_argument("--rounds", type=int, default=3)
    ab = sub.add_parser("ab", help="two configs' training steps, alternating on the same ranks")
    ab.add_argument("--world", type=int, default=1, help="gloo ranks (dp*pp*cp*tp of the configs)")
    ab.add_argument("--base", nargs="*", default=["model=tiny"], help="overrides of both sides")
    ab.add_argument("--a", nargs="*", default=[], help="side a's own overrides")
    ab.add_argument("--b", nargs="*", default=["train.compile=true"], help="side b's own")
    ab.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ab.add_argument("--blocks", type=int, default=4, help="timed blocks per side, alternating")
    moe = sub.add_parser("moe", help="MoE under expert parallelism: a2a bytes, expert load")
    moe.add_argument("--world", type=int, default=2, help="gloo ranks")
    moe.add_argument(
        "--set",
        nargs="*",
        default=["model=qwen3_moe_debug", "parallel.dp=2", "parallel.ep=2"],
        help="the run's overrides",
    )
    moe.add_argument("--steps", type=int, default=40)
    a = parser.parse_args(argv)
    if a.command == "moe":
        print(machine())
        print(format_moe(moe_run(a.set, a.world, a.steps)))
    elif a.command == "ab":
        print(machine())
        print(format_ab(ab_benchmark(a.base, a.a, a.b, a.world, a.steps, a.blocks)))
    elif a.command == "cp":
        sizes = tuple(int(s) for s in a.sizes.split(","))
        memory = cp_memory(a.model, a.seq_len, sizes)
        speed = cp_speed(a.model, a.speed_seq_len, a.steps, a.rounds)
        print(format_cp(memory, speed, a.seq_len, a.speed_seq_len, a.model))
    elif a.command == "memory":
        held = schedule_memory(a.pp, a.microbatches, tuple(a.schedules.split(",")))
        print(format_schedule_memory(held, a.pp, a.microbatches))
    elif a.command == "checkpoint":
        print(machine())
        cold = drop_page_cache()
        print(format_checkpoint_io(checkpoint_io(a.dir, a.model, a.tp), cold))
    elif a.command == "split":
        print(machine())
        print(format_split(split_benchmark(a.model, a.pp, a.steps, a.blocks)))
    elif a.command == "overhead":
        result = overhead(a.steps, a.model, a.warmup, a.seq_len, a.batch, tuple(a.set))
        print(format_overhead(result))
    else:
        names = tuple(a.schedules.split(","))
        rows = pipeline(a.pp, a.microbatches, a.stage_ms, names, a.repeats, a.w_ratio, a.last_stage)
        print(format_pipeline(rows, a.pp, a.microbatches, a.stage_ms, a.w_ratio, a.last_stage))


if __name__ == "__main__":
    main()

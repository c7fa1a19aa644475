"""Write a recorded pipeline step (parallel/pipeline/timeline.py) as timeline.json (Chrome / Perfetto
trace) and timeline.png, drawn like the papers' pipeline diagrams: one row per rank, coloured
F / B / I / W blocks numbered by microbatch, a rank's later chunks lighter, waits hatched, idle
time left blank, and each rank's measured bubble (ms and % of the step) beside its name.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from parallel.pipeline.timeline import WAIT, Event, TimelineInfo, chrome_trace, measured_bubbles

COLOURS = {"F": "#4c78c8", "B": "#3a9a5b", "I": "#8fd19e", "W": "#f2b134"}
NAMES = {
    "F": "forward",
    "B": "backward (full)",
    "I": "backward (input grad)",
    "W": "backward (weight grad)",
}
LATER_CHUNK_ALPHA = 0.65  # how a rank's second and later chunks (stage >= pp) are lightened


def timeline_figure(events: list[Event], info: TimelineInfo) -> Figure:
    """The pipeline diagram of one recorded step."""
    ranks = sorted({e.rank for e in events})
    bubbles = measured_bubbles(events)
    begin = min(e.start for e in events)
    span_ms = (max(e.end for e in events) - begin) * 1000
    fig, ax = plt.subplots(figsize=(13, 1.2 + 0.7 * len(ranks)))
    for row, rank in enumerate(ranks):
        y = len(ranks) - 1 - row  # rank 0 on top, as in the papers
        for e in (e for e in events if e.rank == rank):
            x, w = (e.start - begin) * 1000, (e.end - e.start) * 1000
            if e.kind == WAIT:
                ax.barh(
                    y,
                    w,
                    left=x,
                    height=0.3,
                    color="#dddddd",
                    hatch="////",
                    edgecolor="#999999",
                    linewidth=0,
                )
                continue
            chunk = e.stage // info.layout.pp  # a rank's second chunk is drawn darker
            ax.barh(
                y,
                w,
                left=x,
                height=0.8,
                color=COLOURS[e.kind],
                edgecolor="white",
                linewidth=0.5,
                alpha=1.0 if chunk == 0 else LATER_CHUNK_ALPHA,
            )
            if w > span_ms / 90:
                ax.text(
                    x + w / 2,
                    y,
                    str(e.microbatch),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if e.kind in "FB" and chunk == 0 else "black",
                )
    pp_of = {e.rank: e.pp_rank for e in events}
    ax.set_yticks(  # each rank's measured bubble beside its name: idle ms and share of the step
        range(len(ranks)),
        [
            f"rank {r} (pp {pp_of[r]})\nbubble {bubbles[r] * span_ms:.1f} ms, {bubbles[r]:.1%} of the step"
            for r in reversed(ranks)
        ],
    )
    ax.set_xlim(0, span_ms)
    ax.set_xlabel("time in the step (ms)")
    v = f", v={info.layout.stages_per_rank}" if info.layout.stages_per_rank > 1 else ""
    mbs = "microbatch" if info.layout.microbatches == 1 else "microbatches"
    ax.set_title(
        f"{info.layout.spec.name}: pp={info.layout.pp}{v}, {info.layout.microbatches} {mbs}, step {info.step} "
        f"({span_ms:.1f} ms), formula bubble {info.formula:.1%} of the step "
        f"({info.formula / (1 - info.formula):.1%} of the ideal); "
        "numbers in the blocks are microbatches"
    )
    kinds = [k for k in COLOURS if any(e.kind == k for e in events)]
    handles = [Patch(color=COLOURS[k], label=NAMES[k]) for k in kinds]
    if any(e.stage >= info.layout.pp for e in events if e.kind != WAIT):
        handles.append(
            Patch(
                color=COLOURS[kinds[0]],
                alpha=LATER_CHUNK_ALPHA,
                label="lighter: the rank's later chunk (stage >= pp)",
            )
        )
    handles.append(Patch(facecolor="#dddddd", hatch="////", edgecolor="#999999", label="p2p wait"))
    handles.append(Patch(facecolor="white", edgecolor="#999999", label="blank: idle (bubble)"))
    fig.tight_layout()
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=(len(handles) + 1) // 2,
        fontsize=8,
        frameon=False,
    )  # below the axis label; savefig's tight box keeps it
    return fig


def draw_timeline(events: list[Event], info: TimelineInfo, path: Path) -> None:
    """The pipeline diagram of one recorded step as a PNG."""
    fig = timeline_figure(events, info)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_timeline(events: list[Event], info: TimelineInfo, run_dir: Path) -> list[str]:
    """timeline.json and timeline.png in run_dir; returns one summary line per rank."""
    (run_dir / "timeline.json").write_text(json.dumps(chrome_trace(events, info)))
    draw_timeline(events, info, run_dir / "timeline.png")
    lines = [
        f"timeline of step {info.step} ({info.layout.spec.name}) -> {run_dir / 'timeline.png'}, "
        f"{run_dir / 'timeline.json'} (open in https://ui.perfetto.dev)"
    ]
    span_ms = (max(e.end for e in events) - min(e.start for e in events)) * 1000
    lines += [
        f"  rank {r}: bubble {b:.3f} of the step measured ({b / (1 - b):.3f} of the ideal; "
        f"{b * span_ms:.1f} ms of the {span_ms:.1f} ms step), "
        f"{info.formula:.3f} ({info.formula / (1 - info.formula):.3f}) by the formula"
        for r, b in measured_bubbles(events).items()
    ]
    return lines

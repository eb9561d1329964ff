"""Timeline export: Chrome trace-event JSON (opens in Perfetto or chrome://tracing) and a
Gantt chart PNG, one lane per resource."""

from __future__ import annotations

import json
from pathlib import Path

from specplan.fileio import write_atomic

from .machine import RESOURCES, Span

LANES = (*RESOURCES, "critical path")


def chrome_trace(spans: list[Span], title: str = "specplan simulation") -> dict:
    lanes = {name: i for i, name in enumerate(LANES)}
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": title}}]
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": name}} for name, i in lanes.items()]
    for s in spans:
        events.append({"name": s.stage, "cat": s.resource, "ph": "X", "pid": 0, "tid": lanes.get(s.resource, len(lanes)),
                       "ts": s.start_s * 1e6, "dur": (s.end_s - s.start_s) * 1e6, "args": {"who": s.who}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(spans: list[Span], path: str | Path, title: str = "specplan simulation") -> Path:
    return write_atomic(path, json.dumps(chrome_trace(spans, title)))


def write_gantt(spans: list[Span], path: str | Path, title: str = "", window_s: tuple[float, float] | None = None,
                marks: list[tuple[float, int, int]] | None = None) -> Path:
    """One row per resource, one colour per stage. `window_s` zooms into a time range.
    `marks` (per pass: start s, prompts admitted, prompt tokens it carries) add a top row
    where each pass that admits prompts is a tick labelled with how many."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if window_s:
        lo, hi = window_s
        spans = [s for s in spans if s.end_s >= lo and s.start_s <= hi]
    lanes = [lane for lane in LANES if any(s.resource == lane for s in spans)]
    if marks and window_s:
        marks = [m for m in marks if window_s[0] <= m[0] <= window_s[1]]
    if marks and any(n for _, n, _ in marks):
        lanes = ["admissions", *lanes]
    stages = sorted({s.stage for s in spans})
    cmap = plt.get_cmap("tab20")
    colour = {st: cmap(i % 20) for i, st in enumerate(stages)}
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * len(lanes)))
    for row, lane in enumerate(lanes):
        for st in stages:
            bars = [(s.start_s, s.end_s - s.start_s) for s in spans if s.resource == lane and s.stage == st]
            if bars:
                ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colour[st], label=st)
    if lanes and lanes[0] == "admissions":
        admits = [(t, n) for t, n, _ in marks if n]
        ax.vlines([t for t, _ in admits], -0.4, 0.4, colors="black", linewidth=1.2, label="prompts admitted")
        for t, n in admits[:: max(1, len(admits) // 40)]:  # label at most ~40 ticks
            ax.text(t, -0.45, str(n), fontsize=6, ha="center", va="bottom")
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    if window_s:
        ax.set_xlim(*window_s)
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    ax.legend(seen.values(), seen.keys(), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())

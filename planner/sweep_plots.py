"""The sweep's pictures (PNG, matplotlib's Agg backend): throughput and $ per million tokens
per GPU, one bar per link, the best over host sizes; and per model a heat map of the best
throughput over link x host memory, one panel per GPU."""

from __future__ import annotations

from pathlib import Path


def _label(v) -> str:
    return "own" if v is None else str(v)


def _best(rows: list[dict], key: str, lower: bool = False) -> dict:
    """(target, gpu, pcie, host) -> the best value of `key` over the other axes."""
    out: dict = {}
    for r in rows:
        v = r.get(key)
        if r["status"] != "ok" or v is None:
            continue
        p = r["point"]
        k = (p["target"], p["gpu"], p["pcie"], p["host_mem"])
        if k not in out or (v < out[k] if lower else v > out[k]):
            out[k] = v
    return out


def _save(fig, path: Path) -> str:
    """The figure as a PNG, written atomically."""
    import io

    import matplotlib.pyplot as plt

    from specplan.fileio import write_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return str(path)


BAR_PLOTS = ("tok_s_by_gpu.png", "usd_per_mtok_by_gpu.png")


def heatmap_name(target: str) -> str:
    return f"heatmap_link_host_{target}.png"


def plot_names(targets) -> list[str]:
    """Every file write_plots may write for these targets (the outputs checked before a sweep)."""
    return [*BAR_PLOTS, *(heatmap_name(t) for t in targets)]


def write_plots(rows: list[dict], folder: str) -> list[str]:
    """The PNG files written into `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(folder).mkdir(parents=True, exist_ok=True)
    written = []
    targets = list(dict.fromkeys(r["point"]["target"] for r in rows))
    gpus = list(dict.fromkeys(r["point"]["gpu"] for r in rows))
    links = list(dict.fromkeys(r["point"]["pcie"] for r in rows))
    from specplan.units import parse_bytes

    hosts = sorted(dict.fromkeys(r["point"]["host_mem"] for r in rows),
                   key=lambda h: -1 if h is None else parse_bytes(h, "sweep", "host_mem"))
    # the axes a picture takes the best over without drawing them
    over = [name for key, name in (("draft", "drafts"), ("prompt_len", "prompt lengths"), ("gen_len", "gen lengths"),
                                   ("num_prompts", "job sizes"), ("acceptance", "acceptances"))
            if len({r["point"][key] for r in rows}) > 1]
    also = (", " + ", ".join(over)) if over else ""

    for (key, ylabel, lower), name in zip((("tok_s", "generated tokens / s (simulated)", False),
                                           ("usd_per_mtok", "$ per million generated tokens", True)), BAR_PLOTS):
        best = _best(rows, key, lower)
        if not best:
            continue
        fig, axes = plt.subplots(len(targets), 1, figsize=(max(6, 1.1 * len(gpus) + 2), 3.2 * len(targets)),
                                 squeeze=False)
        width = 0.8 / max(1, len(links))
        for ax, target in zip(axes[:, 0], targets):
            for j, link in enumerate(links):
                vals = []
                for g in gpus:
                    cands = [v for (t, gg, pc, _), v in best.items() if t == target and gg == g and pc == link]
                    vals.append((min(cands) if lower else max(cands)) if cands else 0.0)
                xs = [i + (j - (len(links) - 1) / 2) * width for i in range(len(gpus))]
                ax.bar(xs, vals, width, label=f"PCIe {_label(link)}")
            ax.set_xticks(range(len(gpus)), gpus, rotation=30, ha="right")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{target}: best over host memory{also}" + (" (lower is better)" if lower else ""))
            if len(links) > 1:
                ax.legend(fontsize="small")
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, Path(folder) / name))

    best = _best(rows, "tok_s")
    for target in targets:
        cols = min(3, len(gpus))
        nrows = -(-len(gpus) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
        for ax, g in zip(axes.flat, gpus):
            grid = [[best.get((target, g, link, host), float("nan")) for host in hosts] for link in links]
            im = ax.imshow(grid, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(hosts)), [_label(h) for h in hosts])
            ax.set_yticks(range(len(links)), [f"PCIe {_label(link)}" for link in links])
            ax.set_xlabel("host memory")
            ax.set_title(g)
            for i, line in enumerate(grid):
                for j, v in enumerate(line):
                    ax.text(j, i, "no plan" if v != v else f"{v:.0f}", ha="center", va="center", color="w",
                            fontsize="small")
            fig.colorbar(im, ax=ax, label="tok/s")
        for ax in list(axes.flat)[len(gpus):]:
            ax.axis("off")
        fig.suptitle(f"{target}: simulated tok/s over link x host memory" + (f" (best over{also[1:]})" if also else ""))
        fig.tight_layout()
        written.append(_save(fig, Path(folder) / heatmap_name(target)))
    return written

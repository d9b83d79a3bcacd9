"""Pictures and tables: the measured timeline (one row per rank, one box per action) and comparisons."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: jobs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"F": "#4C9BE8", "B": "#F28E2B", "I": "#E15759", "W": "#59A14F"}
LABELS = {"F": "forward", "B": "backward", "I": "backward (input)", "W": "backward (weight)"}


def draw_timeline(ax, actions: list, title: str, step: int | None = None) -> None:
    """Draw one step's actions (dicts or objects with rank/kind/microbatch/start/end) on ax."""
    get = (lambda a, k: a[k]) if actions and isinstance(actions[0], dict) else getattr
    if step is None:
        step = max((get(a, "step") for a in actions), default=0)
    acts = [a for a in actions if get(a, "step") == step]
    if not acts:
        ax.set_title(f"{title} (no actions recorded)")
        return
    t0 = min(get(a, "start") for a in acts)
    ranks = sorted({get(a, "rank") for a in acts})
    for a in acts:
        row = ranks.index(get(a, "rank"))
        x, w = (get(a, "start") - t0) * 1e3, (get(a, "end") - get(a, "start")) * 1e3
        kind = get(a, "kind")
        ax.broken_barh([(x, w)], (row - 0.4, 0.8), facecolors=COLORS[kind], edgecolor="black", linewidth=0.4)
        if w > 0:
            ax.text(x + w / 2, row, str(get(a, "microbatch")), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step began (white = idle)")
    ax.set_title(title, fontsize=10)
    kinds = sorted({get(a, "kind") for a in acts}, key="FBIW".index)
    ax.legend(
        handles=[plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in kinds],
        labels=[LABELS[k] for k in kinds],
        loc="upper right",
        fontsize=7,
        ncols=len(kinds),
    )


def save_timeline_png(actions: list, path: str, title: str) -> None:
    ranks = {a["rank"] if isinstance(a, dict) else a.rank for a in actions}
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.6 * max(len(ranks), 1)))
    draw_timeline(ax, actions, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_stacked_timelines(panels: list[tuple[str, list]], path: str) -> None:
    """Several runs' timelines above one another, on a shared time axis: how users pick a schedule."""
    heights = [1.0 + 0.5 * max(len({a["rank"] for a in acts}), 1) for _, acts in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(11, sum(heights)), sharex=True, gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    for ax, (title, acts) in zip(axes[:, 0], panels):
        draw_timeline(ax, acts, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def save_predicted_vs_measured(
    points: list[tuple[str, float, float]], path: str, title: str, pick: str | None = None
) -> None:
    """(name, predicted s, measured s) per candidate, the best measured first: a scatter against the
    diagonal, +-10% and +-20% shaded, so a reader sees at once which predictions held. ``pick``,
    the layout predicted best, is ringed. Every point is named up to a dozen; beyond, the best
    measured and the pick are."""
    fig, ax = plt.subplots(figsize=(7.5, 6))
    lo = 0.8 * min(min(p, m) for _, p, m in points) * 1000
    top = 1.15 * max(max(p, m) for _, p, m in points) * 1000
    span = [lo, top]
    ax.plot(span, span, color="gray", lw=1, label="predicted = measured")
    ax.fill_between(
        span, [0.8 * v for v in span], [1.2 * v for v in span], color="gray", alpha=0.12, label="within 20%"
    )
    ax.fill_between(
        span, [0.9 * v for v in span], [1.1 * v for v in span], color="gray", alpha=0.18, label="within 10%"
    )
    for i, (name, pred, meas) in enumerate(points):
        ax.scatter(meas * 1000, pred * 1000, s=30, zorder=3, color="#E15759" if i == 0 else "#4C9BE8")
        if name == pick:
            ax.scatter(meas * 1000, pred * 1000, s=150, zorder=2, facecolors="none", edgecolors="black", lw=1.2)
        if len(points) <= 12 or i == 0 or name == pick:
            label = name + (" (best measured)" if i == 0 else "") + (" (pick)" if name == pick else "")
            below = name == pick and i != 0  # the pick's name under its point, clear of the best's
            ax.annotate(
                label,
                (meas * 1000, pred * 1000),
                fontsize=7,
                xytext=(6, -11 if below else 3),
                textcoords="offset points",
            )
    ax.set_xlim(lo, top)
    ax.set_ylim(lo, top)
    ax.set_xlabel("measured step time (ms)")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Training curves as people watch them: TensorBoard event files while a run goes, curves.png after.

TensorBoard (``RUN/tensorboard/``, written by rank 0 through torch's own
``torch.utils.tensorboard`` writer; ``tensorboard --logdir runs/`` shows every run side by side):
``train/loss`` per step, ``train/samples_per_s`` (``train/tokens_per_s`` for language models)
and ``train/step_time_s`` at each progress line, and at the end ``eval/accuracy``,
``memory/peak_bytes`` per rank and, for pipelines, ``pipeline/bubble_measured``. Losses stay on
the device between progress lines (no host sync per step on GPU) and are written in a batch.
Without the ``tensorboard`` package (the ``tensorboard`` extra) one ``note:`` line says so and
the run goes on.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only: jobs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402


class Scalars:
    """Rank 0's TensorBoard writer, or nothing (other ranks, no run folder, no tensorboard)."""

    def __init__(self, out_dir: str | None, enabled: bool) -> None:
        self.writer = None
        if not (enabled and out_dir):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            print(
                "note: tensorboard is not installed, so no event files are written "
                "(pip install -e '.[tensorboard]'); curves.png is drawn at the end",
                flush=True,
            )
            return
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), flush_secs=10)

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def losses(self, first_step: int, values: list[float]) -> None:
        for i, v in enumerate(values):
            self.add("train/loss", v, first_step + i)

    def finish(self, result: dict) -> None:
        """The end-of-run figures, then close the files."""
        if self.writer is None:
            return
        step = result["steps"]
        if result.get("eval_accuracy") is not None:
            self.add("eval/accuracy", result["eval_accuracy"], step)
        for rank, peak in enumerate(result.get("peak_memory_bytes", [])):
            self.writer.add_scalar(f"memory/peak_bytes_rank{rank}", peak, step)
        if result.get("bubble_fraction") is not None:
            self.add("pipeline/bubble_measured", result["bubble_fraction"], step)
        self.writer.close()
        self.writer = None


def layout_title(result: dict) -> str:
    """``pp | pp 3 | 1f1b, 8 micro-batches | mnist-cnn``: the layout a curve came from."""
    layout = result.get("layout", {})
    parts = [result["strategy"]]
    degrees = [f"{k} {layout[k]}" for k in ("dp", "pp", "tp") if layout.get(k, 1) > 1]
    if result["strategy"] == "mp":
        degrees.append(f"{layout.get('stages', 1)} stages")
    parts.append(" x ".join(degrees) or "1 device")
    if "schedule" in result:
        parts.append(f"{result['schedule']}, {result['microbatches']} micro-batches")
    parts.append(result["model"])
    return " | ".join(parts)


def save_curves_png(result: dict, path: str) -> None:
    """Loss per step and the eval accuracy, with the run's layout in the title."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps = range(1, len(result["losses"]) + 1)
    ax.plot(steps, result["losses"], color="#4C9BE8", linewidth=1.2, label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if result.get("eval_accuracy") is not None:
        acc = ax.twinx()
        acc.plot([len(result["losses"])], [100 * result["eval_accuracy"]], "o", color="#E15759")
        acc.annotate(
            f"eval {100 * result['eval_accuracy']:.1f}%",
            (len(result["losses"]), 100 * result["eval_accuracy"]),
            textcoords="offset points",
            xytext=(-8, -14),
            ha="right",
            color="#E15759",
        )
        acc.set_ylim(0, 100)
        acc.set_ylabel("eval accuracy (%)", color="#E15759")
    ax.set_title(layout_title(result), fontsize=10)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    # what the picture shows, as PNG text: a reader (or a test) can tell the run it was drawn from
    losses = result["losses"]
    about = f"{len(losses)} steps, losses {losses[0]:.4f} to {losses[-1]:.4f}"
    fig.savefig(path, dpi=110, metadata={"Title": layout_title(result), "Description": about})
    plt.close(fig)


def save_overlaid_losses(runs: list[tuple[str, list[float]]], path: str) -> None:
    """Several runs' loss curves in one picture (--compare): the schedule changes time, not the
    maths, so they must lie on top of one another."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    styles = ["-", "--", ":", "-."]
    for i, (label, losses) in enumerate(runs):
        ax.plot(range(1, len(losses) + 1), losses, styles[i % len(styles)], linewidth=1.4, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("loss per step of every run (they coincide: same maths, other schedules)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""What a person watches while a run goes: progress lines with the time left, TensorBoard scalars.

A progress line every ``--log-every`` steps, and at least every ``EVERY_S`` seconds however slow
the steps are, with the rate since the previous line and the time left at that rate. The same
moments write TensorBoard scalars (core.report.curves.Scalars). Losses stay on the device between
lines: one host sync per line, not per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from core.report.curves import Scalars

EVERY_S = 30.0
"""A line at least this often: a person planning around a run should never wait long for news."""


def duration(seconds: float) -> str:
    """``1h02m``, ``4m05s``, ``12s``: what a person reads at a glance."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class LiveReport:
    def __init__(
        self,
        say: Callable[[str], None],
        scalars: Scalars,
        n_steps: int,
        first_step: int,
        samples_per_step: int,
        tokens_per_sample: int | None,
        log_every: int,
    ) -> None:
        self.say, self.scalars, self.n_steps = say, scalars, n_steps
        self.samples_per_step, self.tokens_per_sample, self.log_every = samples_per_step, tokens_per_sample, log_every
        self.first_step = first_step  # steps done before this attempt (a resume)
        self.t0 = self.last_t = time.perf_counter()
        self.last_step = first_step
        self.pending: list[torch.Tensor] = []

    def step_done(self, step: int, epoch: int, loss: torch.Tensor) -> None:
        """After optimizer step ``step`` (1-based): a line and scalars when one is due."""
        self.pending.append(loss)
        now = time.perf_counter()
        due = (
            step % self.log_every == 0
            or step == self.n_steps
            or step == self.first_step + 1
            or now - self.last_t >= EVERY_S
        )
        if not due:
            return
        values = [float(v) for v in torch.stack(self.pending).float().cpu()]
        self.scalars.losses(step - len(values) + 1, values)
        self.pending = []
        step_s = (now - self.last_t) / max(step - self.last_step, 1)
        rate = self.samples_per_step / step_s if step_s > 0 else float("inf")
        left = (self.n_steps - step) * (now - self.t0) / max(step - self.first_step, 1)
        self.scalars.add("train/step_time_s", step_s, step)
        if self.tokens_per_sample:
            self.scalars.add("train/tokens_per_s", rate * self.tokens_per_sample, step)
        else:
            self.scalars.add("train/samples_per_s", rate, step)
        tokens = f"  {rate * self.tokens_per_sample:,.0f} tokens/s" if self.tokens_per_sample else ""
        # the first step pays for warm-up (allocations, shape inference): no forecast from it alone
        left_text = f"  {duration(left)} left" if step > self.first_step + 1 else ""
        self.say(
            f"step {step}/{self.n_steps}  epoch {epoch + 1}  loss {values[-1]:.4f}  {rate:.1f} samples/s{tokens}  "
            f"{1e3 * step_s:.0f} ms/step{left_text}"
        )
        self.last_t, self.last_step = now, step

"""The contract a model meets to be cut into stages (README "Your own model"), checked on the
submitting host before anything is queued: what cannot work is refused in one line that says
what to change. What works is handled by the styles (mp/placement.py, pp/pipeline.py):

- a block may return a tuple of tensors; the next block receives it as one argument, in one
  process (mp) or from another rank (pp, where torch passes it as several: BlockModel.forward
  joins them again);
- a stage output that is a view or not contiguous is sent as a contiguous copy (gloo and NCCL
  send contiguous buffers only);
- parameters outside the blocks (used by ``loss``) live with the last stage, where the loss runs;
- weights tied between blocks on different stages are refused: each stage would train its own
  copy (pp) or hold one tensor on two devices (mp);
- a model that overrides ``forward`` is refused by pp: a stage runs the blocks it holds, in order,
  and nothing else of the model's forward.
"""

from __future__ import annotations

from core.config import ConfigError, RunConfig
from core.models.base import BlockModel, tied_groups
from core.parallel.partition import stage_blocks


def stages_of(names: list[list[str]]) -> dict[str, int]:
    return {block: i for i, blocks in enumerate(names) for block in blocks}


def tie_refusal(model: BlockModel, names: list[list[str]] | None, model_name: str) -> str | None:
    """Why tied weights cannot be cut this way (None: no tie crosses a seam). ``names``: the
    blocks of each stage, or None when the cut is not known before the run (chosen by --balance)."""
    for owners in tied_groups(model):
        blocks = [b for b, _ in owners]
        where = None if names is None else {stages_of(names)[b] for b in blocks}
        if where is None or len(where) > 1:
            tied = " and ".join(p for _, p in owners)
            return (
                f"--model {model_name}: {tied} are one tied weight, and the cut puts blocks "
                f"{', '.join(blocks)} on different stages, which would train separate copies: untie them, "
                f"or give --split so that those blocks share a stage"
            )
    return None


def check_cut(model: BlockModel, cfg: RunConfig, stages: int) -> None:
    """The host-side checks for mp and pp (ConfigError: one line, exit 2)."""
    if cfg.strategy == "pp" and type(model).forward is not BlockModel.forward:
        raise ConfigError(
            f"--model {cfg.model} overrides forward(): a pipeline stage runs only its blocks, in order, so "
            "that code would never run: move it into a block (or use --strategy mp)"
        )
    # the cut is known here when --split gives it or there is none; else --balance picks it in the job
    names = stage_blocks(model, stages, cfg.split) if cfg.split is not None or stages == 1 else None
    if names is None and not tied_groups(model):
        return
    why = tie_refusal(model, names, cfg.model)
    if why:
        raise ConfigError(why)

"""The checks that need the model, the layout or the contract, run once on the submitting host."""

from __future__ import annotations

from core.config import ConfigError, RunConfig
from core.models import describe
from core.models.base import batch_coupled
from core.models.registry import dataset_factory, is_import_path
from core.parallel.contract import check_cut
from core.parallel.layout import Layout


def check_model_and_layout(cfg: RunConfig) -> Layout:
    """Raise ConfigError for the first mistake that needs the model, its blocks, the layout or the
    pipeline contract to see; return the run's Layout. Run after core.config.validate."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    model = describe(cfg.model, cfg.flavor)  # unknown model or flavor, a factory that fails: one line
    n_blocks = len(model.blocks)
    dataset_factory(cfg.resolved_dataset)  # unknown name, or an import path that does not import
    need(
        cfg.resolved_dataset in model.datasets or is_import_path(cfg.resolved_dataset),
        f"--model {cfg.model} does not train on --dataset {cfg.resolved_dataset}: use "
        f"{' or '.join(model.datasets)} (or your own, package.module:factory)",
    )

    layout = Layout.from_config(cfg)
    layout.check_batch(cfg.resolved_batch_size)
    local = layout.local_batch(cfg.resolved_batch_size)
    need(
        local >= 2 or not batch_coupled(model),
        f"--model {cfg.model} has batch norm, which needs at least 2 samples per replica; --batch-size "
        f"{cfg.resolved_batch_size} over {layout.dp} replicas leaves {local}: raise --batch-size",
    )

    # Stages: no more than there are blocks; an explicit split must describe every block.
    if cfg.strategy in ("mp", "pp"):
        need(
            layout.stages <= n_blocks,
            f"--gpus {cfg.gpus} gives {layout.stages} stages per replica{_per_rank(cfg, layout)}, but "
            f"{cfg.model} has only {n_blocks} blocks: use at most {n_blocks} stages",
        )
    if cfg.balance is not None:
        need(cfg.strategy in ("mp", "pp"), "--balance applies to --strategy mp or pp")
        need(cfg.split is None, "--split and --balance both choose the cut: give one of them")
    if cfg.split is not None:
        need(cfg.strategy in ("mp", "pp"), "--split applies to --strategy mp or pp")
        need(all(s >= 1 for s in cfg.split), f"--split {_fmt(cfg.split)} holds a zero: every stage needs a block")
        need(
            sum(cfg.split) == n_blocks,
            f"--split {_fmt(cfg.split)} sums to {sum(cfg.split)}, but {cfg.model} has {n_blocks} blocks",
        )
        need(
            len(cfg.split) == layout.stages,
            f"--split {_fmt(cfg.split)} gives {len(cfg.split)} stages, but the layout has {layout.stages} "
            f"per replica{_per_rank(cfg, layout)}",
        )

    if cfg.strategy in ("mp", "pp"):
        check_cut(model, cfg, layout.stages)  # the pipeline contract (core/parallel/contract.py)
    return layout


def _per_rank(cfg: RunConfig, layout) -> str:
    if layout.stages_per_rank == 1:
        return ""
    return f" (--schedule {cfg.schedule} puts {layout.stages_per_rank} on each of {layout.pp} pipeline ranks)"


def _fmt(split: list[int]) -> str:
    return ",".join(str(s) for s in split)

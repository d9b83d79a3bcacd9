"""Imports flow one way: no cycle between the project's modules, and project imports at module level."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import import_cycles  # noqa: E402

# Project imports still made inside a function body, each with its reason. None of them can hide a
# cycle: the cycle check above counts function-level imports like module-level ones.
FUNCTION_LEVEL = {
    # only the chosen style is loaded: a reference or mp run never imports pipelining or DTensor
    ("jobs.plan.strategies", "core.check.reference"): "load the chosen style only",
    ("jobs.plan.strategies", "mp"): "load the chosen style only",
    ("jobs.plan.strategies", "pp"): "load the chosen style only",
    ("jobs.plan.strategies", "tp"): "load the chosen style only",
    ("jobs.plan.strategies", "tp.build"): "load the chosen style only",
    # a pipeline without --tp never loads tensor parallelism
    ("pp.pipeline", "tp"): "tensor parallel inside stages is optional",
    # the plan reads which files a run folder holds from the launch room, the one upward name
    ("jobs.plan.prepare", "jobs.launch.run_folder"): "the run folder's file names",
}


def test_the_cycle_check_finds_none():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "import_cycles.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 cycles" in out.stdout


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from core.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from core import a\n")
    modules = {"core": pkg / "__init__.py", "core.a": pkg / "a.py", "core.b": pkg / "b.py"}
    graph, function_level = import_cycles.import_graph(modules)
    assert import_cycles.cycles(graph) == [["core.a", "core.b"]]
    assert function_level == [("core.b", 2, "core.a")]


def test_project_imports_inside_functions_are_only_the_listed_ones():
    _, function_level = import_cycles.import_graph()
    found = {(module, target) for module, _, target in function_level}
    unlisted = sorted(found - set(FUNCTION_LEVEL))
    assert not unlisted, f"move these imports to the top of their modules: {unlisted}"


def test_every_module_opens_with_one_line_saying_its_job():
    missing = []
    for name, path in import_cycles.project_modules().items():
        doc = (path.read_text().lstrip().split("\n", 1)[0]).strip()
        if not doc.startswith(('"""', "'''")) or len(doc) <= 6:
            missing.append(name)
    assert not missing, f"these modules do not open with a one-line docstring: {missing}"


# (importer prefix, imported prefix): what a room must not import, because it sits above it
UPWARD = [
    ("core", "jobs"),
    ("core", "mp"),
    ("core", "pp"),
    ("core", "tp"),
    ("core.models", "core.config"),
    ("core.models", "core.parallel"),
    ("core.models", "core.training"),
    ("core.config", "core.parallel"),
    ("core.config", "core.training"),
    ("mp", "pp"),
    ("mp", "tp"),
    ("tp", "mp"),
    ("tp", "pp"),
    ("mp", "jobs"),
    ("pp", "jobs"),
    ("tp", "jobs"),
    ("jobs.plan", "jobs.cli"),
    ("jobs.plan", "jobs.launch"),
    ("jobs.launch", "jobs.cli"),
]
# the plan reads the launch room's list of the files a run folder holds
UPWARD_ALLOWED = {("jobs.plan.prepare", "jobs.launch.run_folder")}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_rooms_import_downwards_only():
    graph, _ = import_cycles.import_graph()
    upward = sorted(
        (m, t)
        for m, targets in graph.items()
        for t in targets
        for low, high in UPWARD
        if _within(m, low) and _within(t, high) and (m, t) not in UPWARD_ALLOWED
    )
    assert not upward, f"imports against the rooms' order (docs/architecture.md): {upward}"

"""The torchvision zoo as a table: every classification model, cut into blocks, checked under mp 2 and pp 2.

For each model of ``torchvision.models.list_models(module=torchvision.models)``: the submitting
host's check (the model built on the meta device, ``jobs.strategies.validate_run``), its block
count and image size, then ``--check`` (loss and every gradient against the single-device
reference) under ``--strategy mp --gpus 2`` and ``--strategy pp --gpus 2`` (gpipe, 2 micro-batches)
on CPU, FakeData, batch 4, 2 steps. A refusal is recorded as its one line; anything else that
stops a model (a traceback, the time box) as a crash. Writes docs/torchvision-zoo.md and
docs/torchvision-zoo.json.

Each model runs in a child process of its own, under a time box (``--timeout``), so one slow or
crashing model costs only itself. Inside the child the suite's own functions run, not the command:
``python jobs/submit.py`` costs ~25 s of launching per run on a 2-core host (resnet18 mp 2: 25.7 s
wall for 0.7 s of training), 80 models x 2 layouts would spend over an hour starting processes.
mp runs in the child (``core.train.run`` with ``mp.build``, as a launched mp rank does); pp spawns
two gloo ranks, each ``core.train.run`` with the pp build (what ``jobs.task`` runs on a rank).
``--submit`` runs the real command instead, for spot checks.

    python bench/torchvision_zoo.py                       # all 80, ~1 h on 2 cores
    python bench/torchvision_zoo.py --only 'efficientnet|convnext|swin|maxvit'   # re-run some, merge
    python bench/torchvision_zoo.py --only resnet18 --submit   # through python jobs/submit.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DOCS = os.path.join(ROOT, "docs")
# --balance params: the default (time) measures every block's forward and backward before the run,
# which on a shared 2-core host cost more than the run itself; the check does not depend on the cut
RUN = dict(
    dataset="fakedata",
    batch_size=4,
    steps=2,
    eval_samples=8,
    check=True,
    device="cpu",
    log_every=1000,
    balance="params",
)
PP = dict(schedule="gpipe", microbatches=2)  # micro-batches of 2: batch norm needs 2 values per channel


def _config(model: str, strategy: str):
    from core.config import RunConfig

    extra = PP if strategy == "pp" else {}
    return RunConfig(strategy=strategy, gpus=2, model=model, dist_timeout_s=120.0, **RUN, **extra)


def _check(r: dict) -> dict:
    c = r["check"]
    return {
        "passed": bool(c["passed"]),
        "max_grad_rel_diff": c["max_grad_rel_diff"],
        "max_loss_abs_diff": c.get("max_loss_abs_diff"),
    }


def _pp_rank(model: str, rank: int, port: int, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)  # two ranks on two cores
    from core.parallel import distributed
    from core.parallel.layout import Layout
    from core.training import train
    from jobs.plan.strategies import get_build

    c = _config(model, "pp")
    try:
        state = distributed.init_distributed(Layout.from_config(c), "cpu", timeout_s=120.0)
        try:
            out.put((rank, "ok", _check(train.run(c, state, get_build("pp")))))
        finally:
            distributed.shutdown()
    except Exception as e:  # noqa: BLE001  the table records what stopped it
        out.put((rank, "error", _one_line(e)))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _pp(model: str) -> dict:
    import multiprocessing as mp

    from core.parallel.distributed import free_port

    # fork, not spawn: the child has imported torch and computed nothing yet (pp runs first), so the
    # ranks start in a moment instead of importing everything again (~10 s a model on a busy host)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_pp_rank, args=(model, r, port, out), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, status, value = out.get()
        results[rank] = (status, value)
    for p in procs:
        p.join(10)
    errors = [f"rank {r}: {v}" for r, (s, v) in sorted(results.items()) if s != "ok"]
    if errors:
        return {"error": errors[0]}
    return results[1][1]  # the last stage holds the loss; both ranks report the same check


def one(name: str) -> dict:
    """Everything about one model (in its own process)."""
    import torch

    from core.config import ConfigError
    from core.models import describe
    from jobs.plan.strategies import validate_run

    torch.set_num_threads(2)
    model = f"torchvision:{name}"
    row: dict = {"model": name}
    t0 = time.time()
    try:
        validate_run(_config(model, "mp"))  # the submitting host: meta device, one line or nothing
        m = describe(model, "tiny")  # what it built (cached): shapes only
    except ConfigError as e:
        row["refused"] = str(e)
        return row
    row["blocks"] = len(m.blocks)
    row["image"] = "x".join(map(str, m.image_shape))
    row["params"] = sum(p.numel() for p in m.parameters())
    row["uncut_names"] = len(m.uncut_names()) == len(m.state_dict())
    row["build_s"] = round(time.time() - t0, 1)
    from core.training.train import run
    from mp import build as mp_build

    for strategy in ("pp", "mp"):  # pp first: its ranks fork from a process that has computed nothing
        t = time.time()
        try:
            validate_run(_config(model, strategy))  # the submitting host's checks for this layout
            if strategy == "mp":
                from core.parallel.distributed import DistState
                from core.parallel.layout import Layout

                c = _config(model, "mp")
                row["mp"] = _check(run(c, DistState(Layout.from_config(c), device=torch.device("cpu")), mp_build))
            else:
                row["pp"] = _pp(model)
        except ConfigError as e:
            row[strategy] = {"refused": str(e)}
        except Exception as e:  # noqa: BLE001
            row[strategy] = {"error": _one_line(e)}
        row[strategy]["seconds"] = round(time.time() - t, 1)
    return row


def one_submitted(name: str, out_dir: str) -> dict:
    """The same through ``python jobs/submit.py`` (spot checks: ~25 s of launching per run)."""
    row: dict = {"model": name}
    for strategy in ("mp", "pp"):
        folder = os.path.join(out_dir, f"{name}-{strategy}")
        args = [sys.executable, os.path.join(ROOT, "jobs", "submit.py"), "--strategy", strategy, "--gpus", "2"]
        args += ["--model", f"torchvision:{name}", "--check", "--steps", "2", "--batch-size", "4", "--out", folder]
        args += ["--cluster", "local", "--device", "cpu", "--dataset", "fakedata", "--eval-samples", "8"]
        args += ["--balance", "params"]
        if strategy == "pp":
            args += ["--schedule", "gpipe", "--microbatches", "2"]
        t = time.time()
        p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        result = os.path.join(folder, "result.json")
        if os.path.exists(result):
            with open(result) as f:
                row[strategy] = _check(json.load(f))
        elif p.returncode == 2:
            row[strategy] = {"refused": p.stderr.strip().splitlines()[-1]}
        else:
            row[strategy] = {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        row[strategy]["seconds"] = round(time.time() - t, 1)
    return row


def _cell(r: dict, strategy: str) -> str:
    v = r.get(strategy)
    if v is None:
        return "-"
    if "passed" in v:
        return "passed" if v["passed"] else "**FAILED**"
    if "refused" in v:
        return "refused"
    return "**crashed**"


def _note(r: dict) -> str:
    if "refused" in r:
        return "refused: " + r["refused"]
    if "timeout" in r:
        return f"**time box**: {r['timeout']}"
    if "error" in r:
        return "**crashed**: " + r["error"]
    notes = []
    for s in ("mp", "pp"):
        v = r.get(s, {})
        if "refused" in v or "error" in v:
            notes.append(f"{s}: {v.get('refused') or v.get('error')}")
    return "; ".join(notes)


def _diff(r: dict) -> str:
    d = [r[s]["max_grad_rel_diff"] for s in ("mp", "pp") if "max_grad_rel_diff" in r.get(s, {})]
    return " / ".join("0" if x == 0 else f"{x:.1e}" for x in d) if d else ""


def write(rows: dict, meta: dict) -> None:
    with open(os.path.join(DOCS, "torchvision-zoo.json"), "w") as f:
        json.dump({"meta": meta, "models": rows}, f, indent=1)
    ordered = [rows[k] for k in sorted(rows)]
    both = sum(1 for r in ordered if _cell(r, "mp") == "passed" and _cell(r, "pp") == "passed")
    refused = sum(1 for r in ordered if "refused" in r)
    lines = [
        "# The torchvision zoo, cut into blocks",
        "",
        "Written by `python bench/torchvision_zoo.py` (the numbers of its last run; the JSON beside this",
        "file holds every field). Each classification model of torchvision "
        f"{meta.get('torchvision', '?')} (torch {meta.get('torch', '?')}),",
        "10 classes, untrained, `--flavor tiny` (32x32 images, or the smallest size the model takes: the",
        "image column), FakeData, batch 4, 2 steps, `--balance params`, `--check` on CPU (gloo, fp32): **mp 2** is",
        "`--strategy mp --gpus 2`, **pp 2** is `--strategy pp --gpus 2 --schedule gpipe --microbatches 2`.",
        "The grad column is the largest relative gradient difference from the single-device reference",
        "(mp / pp; the tolerance is 1e-5). Each model ran in a process of its own under a time box of",
        f"{meta.get('timeout_s', '?')} s; the suite's functions ran in it (the command costs ~25 s of launching",
        "per run on this host: see the script's docstring).",
        "",
        f"{len(ordered)} models: {both} pass both checks, {refused} refused in one line, "
        f"{len(ordered) - both - refused} other (see the notes).",
        "",
        "| model | blocks | image | params | mp 2 | pp 2 | max grad rel diff (mp / pp) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ordered:
        params = f"{r['params'] / 1e6:.1f}M" if "params" in r else ""
        lines.append(
            f"| {r['model']} | {r.get('blocks', '')} | {r.get('image', '')} | {params} | {_cell(r, 'mp')} | "
            f"{_cell(r, 'pp')} | {_diff(r)} | {_note(r).replace('|', '/')} |"
        )
    lines += ["", meta.get("note", ""), ""]
    with open(os.path.join(DOCS, "torchvision-zoo.md"), "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="regular expression: run the models it matches, keep the others' rows")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model (default 300)")
    ap.add_argument("--submit", action="store_true", help="through python jobs/submit.py (slow)")
    ap.add_argument("--budget", type=float, help="seconds for the whole sweep: models not started by then are listed")
    ap.add_argument("--skip-done", action="store_true", help="keep the rows of models that already have a result")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child: one model, JSON on stdout's last line
    args = ap.parse_args()
    if args.one:
        print("ZOO " + json.dumps(one(args.one)), flush=True)
        return

    import torch
    import torchvision
    from torchvision import models

    names = models.list_models(module=models)
    if args.only:
        names = [n for n in names if re.search(args.only, n)]
    path = os.path.join(DOCS, "torchvision-zoo.json")
    rows, meta = {}, {}
    if os.path.exists(path) and (args.only or args.skip_done):
        with open(path) as f:
            old = json.load(f)
        rows, meta = old["models"], old["meta"]
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    meta.update(torch=torch.__version__, torchvision=torchvision.__version__, timeout_s=args.timeout)
    # smallest first (parameters, from the meta build): a time box then cuts the giants, not the zoo
    from core.config import ConfigError
    from core.models import describe

    def size(name: str) -> int:
        try:
            return sum(p.numel() for p in describe(f"torchvision:{name}", "tiny").parameters())
        except ConfigError:
            return 0

    # and the smallest of each family (resnet, vgg, vit, ...) before all others: the table covers
    # the families first
    family = {n: re.match(r"[a-z]+", n).group() for n in names}
    sizes = {n: size(n) for n in names}
    smallest = {f: min((n for n in names if family[n] == f), key=sizes.get) for f in set(family.values())}
    names.sort(key=lambda n: (smallest[family[n]] != n, sizes[n]))
    if args.skip_done:
        names = [n for n in names if n not in rows or "timeout" in rows[n] or "error" in rows[n]]
    t_all = time.time()
    for name in names:
        t = time.time()
        if args.budget and t - t_all > args.budget:
            rows[name] = {"model": name, "timeout": f"not started: the sweep's budget of {args.budget:.0f} s was spent"}
            continue
        if args.submit:
            with tempfile.TemporaryDirectory() as d:
                row = one_submitted(name, d)
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", name]
            # a session of its own: on the time box its pp ranks go with it (os.killpg), not just the child
            p = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True
            )
            try:
                stdout, stderr = p.communicate(timeout=args.timeout)
                found = [ln for ln in stdout.splitlines() if ln.startswith("ZOO ")]
                if found:
                    row = json.loads(found[-1][4:])
                else:
                    tail = (stderr.strip().splitlines() or ["no output"])[-1]
                    row = {"model": name, "error": f"exit {p.returncode}: {tail[:300]}"}
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
                row = {"model": name, "timeout": f"no result within {args.timeout:.0f} s"}
        row["seconds"] = round(time.time() - t, 1)
        row["commit"] = commit.stdout.strip()
        rows[name] = row
        print(
            f"{name}: {_cell(row, 'mp')} / {_cell(row, 'pp')} {_diff(row)} {_note(row)} ({row['seconds']} s)",
            flush=True,
        )
        write(rows, meta)
    meta["last_run_s"] = round(time.time() - t_all, 1)
    write(rows, meta)


if __name__ == "__main__":
    main()

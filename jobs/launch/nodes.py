"""Which node a failed multi-node job lost, which ranks ran there, and whether a retry fits.

A node that dies (power, link, slurmd) takes its ranks with it; the ranks on the other nodes only
see a collective time out, and Slurm reports NODE_FAIL. The user needs one line: the node, the
ranks that were on it, and whether ``--max-retries`` can bring the job back on what remains.

Where each rank ran comes from the tasks themselves (submitit logs ``hostname=`` and
``global_rank=`` at the start of every task); if a task never started, from Slurm's block
distribution of the job's node list (tasks are numbered node by node). Node health comes from
``scontrol`` (works without an accounting daemon; sacct does not).

    from jobs.launch.nodes import explain_failure
    line = explain_failure(job, "what the ranks said", cfg)
"""

from __future__ import annotations

import re
import subprocess

BAD = ("DOWN", "NOT_RESPONDING", "FAIL", "FAILING", "DRAIN", "POWERED_DOWN", "REBOOT")
"""Node state words (scontrol's State=A+B+...) that mean the node cannot run or finish a job."""


def _run(*cmd: str, timeout: float = 20.0) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return p.stdout if p.returncode == 0 else ""


def expand_nodelist(nodelist: str) -> list[str]:
    """n[1-3],gpu7 -> [n1, n2, n3, gpu7], by Slurm itself (scontrol show hostnames)."""
    return _run("scontrol", "show", "hostnames", nodelist).split()


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (NodeList, Partition, JobState, ...); empty if forgotten."""
    return dict(re.findall(r"(\w+)=(\S*)", _run("scontrol", "-o", "show", "job", str(job_id))))


def node_health(names: list[str]) -> dict[str, tuple[str, str]]:
    """node -> (State, Reason) from scontrol; every node of the cluster when ``names`` is empty."""
    out = {}
    for line in _run("scontrol", "-o", "show", "node", *([",".join(names)] if names else [])).splitlines():
        name = re.search(r"NodeName=(\S+)", line)
        state = re.search(r"State=(\S+)", line)
        reason = re.search(r"Reason=(.*?)(?: \[|$)", line)
        if name and state:
            out[name.group(1)] = (state.group(1), reason.group(1).strip() if reason else "")
    return out


def is_bad(state: str) -> bool:
    words = re.split(r"[+ ]", state.upper())
    return state.endswith("*") or any(w in BAD for w in words)


WAIT_FOR_SLURM_S = 20.0
"""How long a peer-lost failure waits for Slurm to mark the node (inside the issue's bound of
collective timeout + 30 s)."""
STARTED = re.compile(r"JobEnvironment\(.*?hostname=([^,\s]+).*?global_rank=(\d+)")


def task_nodes(job, nodelist: list[str]) -> dict[int, str]:
    """rank -> node name: what each task logged when it started; else block distribution."""
    n = job.num_tasks
    per_node = max(1, n // max(1, len(nodelist)))
    where = {r: nodelist[min(r // per_node, len(nodelist) - 1)] for r in range(n)} if nodelist else {}
    for i in range(n):
        try:
            with open(job.task(i).paths.stdout, errors="replace") as f:
                m = STARTED.search(f.read(20000))
        except OSError:
            continue
        if m:
            where[int(m.group(2))] = m.group(1)
    return where


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def retry_outlook(partition: str, lost: list[str], nodes_needed: int, max_retries: int, checkpointed: bool) -> str:
    """Whether the job's layout fits on the partition's nodes that are still up."""
    if max_retries <= 0:
        return "no retry (--max-retries 0)"
    if not checkpointed:
        return "no retry: without --checkpoint-every there is no checkpoint to resume from"
    up = []
    for line in _run("sinfo", "-h", "-N", "-p", partition, "-o", "%N %T").splitlines():
        name, state = (line.split() + [""])[:2]
        if name not in lost and not is_bad(state) and name not in up:
            up.append(name)
    if len(up) >= nodes_needed:
        return f"a retry (--max-retries {max_retries}) can come back on the nodes still up: {', '.join(up)}"
    have = f"{len(up)} ({', '.join(up)})" if up else "none"
    return (
        f"a retry cannot come back: the layout needs {nodes_needed} node(s), partition {partition} has {have} up; "
        f"resume with fewer --nodes (same --gpus per node) once a checkpoint exists, or wait for the node"
    )


def lost_nodes(job) -> tuple[list[str], dict[str, tuple[str, str]], dict[int, str], dict[str, str]]:
    """(lost node names, their health, rank -> node, the job's scontrol fields)."""
    fields = job_fields(job.job_id)
    nodelist = expand_nodelist(fields["NodeList"]) if fields.get("NodeList") not in (None, "", "(null)") else []
    health = node_health(nodelist) if nodelist else {}
    lost = [n for n in nodelist if n in health and is_bad(health[n][0])]
    return lost, health, task_nodes(job, nodelist), fields


def explain_failure(job, message: str, cfg=None) -> str:
    """``message`` prefixed by the lost node(s) and their ranks when the job lost a node; else
    ``message`` unchanged. ``cfg`` (the RunConfig) says how many nodes a retry needs and whether
    one may happen. Never raises: a failure explanation must not hide the failure."""
    nodes_needed = getattr(cfg, "nodes", 1)
    import time

    # ranks that lost a peer (timeout, reset connection) may end the job before Slurm has noticed
    # the node: its detection takes ~15 s (SlurmdTimeout; a floor in 22.05), so ask again for a while
    peer_trouble = nodes_needed > 1 and re.search(r"time(d)? ?out|connection|node_fail|node failure", message, re.I)
    deadline = time.time() + (WAIT_FOR_SLURM_S if peer_trouble else 0)
    while True:
        try:
            lost, health, where, fields = lost_nodes(job)
        except Exception:  # noqa: BLE001 - best effort on top of a message that is already right
            return message
        if lost or time.time() >= deadline:
            break
        time.sleep(2)
    if not lost:
        return message
    parts = []
    for n in lost:
        state, reason = health[n]
        ranks = sorted(r for r, node in where.items() if node == n)
        why = f"{state}{': ' + reason if reason else ''}"
        parts.append(f"node {n} lost ({why}) with {_ranks(ranks) if ranks else 'no rank'}")
    outlook = retry_outlook(
        fields.get("Partition", ""),
        lost,
        nodes_needed,
        getattr(cfg, "max_retries", 0),
        bool(getattr(cfg, "checkpoint_every", None)),
    )
    return f"{'; '.join(parts)}; {outlook}. What the ranks said: {message}"

"""The serving path, A/B between git trees, driven by wrk (a load generator in C, so that the client
does not take the core a Python client would): `python -m benchmarks.serving_path`.

Each tree (a commit, checked out as a git worktree) serves the committed digits model with the
default settings, where HTTP and pre-processing are most of a request; wrk POSTs a 64x64 PNG digit
to /predict in closed loops at each concurrency, the trees taking turns (A B B A A B ...), so that
a change in the machine's load hits both alike. For each run: req/s, p50 and p99, errors and the
server's CPU per request by thread name (benchmarks.loadgen.measured). The raw reference is the
in-process decode, pre-process and session.run at batch 1 on the same image (benchmarks.service.Raw),
measured before any server starts; the issue's target is the service at 1.4x of it under load.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks import machine
from benchmarks.loadgen import measured, wrk
from benchmarks.report import cpu_split
from benchmarks.service import Raw, Server, load_upload
from benchmarks.timing import Budget

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "model_repository" / "stepnet-digits" / "1"


def raw_reference() -> float:
    """Images/s of decode + pre-process + session.run at batch 1 in one thread, the PNG digit."""
    upload = load_upload("digits")
    raw = Raw(DIGITS, [upload], os.cpu_count() or 1)
    return raw.end_to_end(upload[1], Budget(warmup=20, seconds=8.0, min_reps=200, max_reps=100_000))["throughput"]


def worktree(commit: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(where), commit],
                   check=True, capture_output=True, timeout=120)
    return where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="LABEL=COMMIT",
                        help="a tree to serve, e.g. old=HEAD~3 new=HEAD (. : the working tree)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="A B, then B A, this many times")
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    args = parser.parse_args(argv)
    raw = raw_reference()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = {}
        for spec in args.tree:
            label, commit = spec.split("=", 1)
            trees[label] = ROOT if commit == "." else worktree(commit, work / label)
        rows = []
        try:
            labels = list(trees)
            order = [lab for r in range(args.rounds) for lab in (labels if r % 2 == 0 else labels[::-1])]
            for label in order:
                rows += serve_and_load(label, trees[label], work, args)
        finally:
            for label, path in trees.items():
                if path != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                                   capture_output=True, timeout=60)
    args.out.write_text(report(rows, raw, args))
    print(args.out.read_text())
    return 0


def serve_and_load(label: str, tree: Path, work: Path, args) -> list[dict]:
    # PYTHONSAFEPATH: `-m` does not put the working directory first, so the tree's packages are
    # imported (PYTHONPATH) before the installed ones
    env = {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
    server = Server(ROOT / "model_repository", work / f"server-{label}.log", env=env)
    rows, (_, body, kind) = [], load_upload("digits")
    try:
        server.wait_ready()
        for c in args.concurrency:
            run = measured(server, lambda: wrk(server.url + "/predict", body, {"Content-Type": kind}, c,
                                               args.seconds))
            rows.append({"tree": label, "concurrency": c, **run})
            time.sleep(1)
    finally:
        server.stop()
    return rows


def report(rows: list[dict], raw: float, args) -> str:
    described = machine.describe()
    flags = ", ".join(f for f in machine.cpu_flags() if f.startswith(("avx", "amx", "fma")))
    lines = [f"# Serving path A/B, digits model, wrk ({time.strftime('%Y-%m-%d')})", "",
             f"- Machine: {described.get('cpu', machine.cpu_model())}, {machine.cores()} cores ({flags}); "
             f"load average before: {', '.join(f'{x:.1f}' for x in machine.load_average())}.",
             f"- Trees: {', '.join(args.tree)}. `stepnet serve` with the default settings; "
             f"`wrk -t2 -c<C> -d{args.seconds:g}s` POSTing one 64x64 PNG digit to /predict; "
             f"trees in turn, {args.rounds} rounds.",
             f"- Raw reference (decode + pre-process + session.run at batch 1, one thread): "
             f"**{raw:.1f} images/s**.", "",
             "| tree | concurrency | req/s | / raw | p50 ms | p99 ms | errors | server CPU ms/request (by thread) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['tree']} | {row['concurrency']} | {row['throughput']:.1f} | "
                     f"{row['throughput'] / raw:.2f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                     f"{row['errors']} | {cpu_split(row)} |")
    lines += ["", "| tree | concurrency | mean req/s | / raw |", "|---|---|---|---|"]
    means: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        means[(row["tree"], row["concurrency"])].append(row["throughput"])
    for (tree, c), values in means.items():
        mean = sum(values) / len(values)
        lines.append(f"| {tree} | {c} | {mean:.1f} | {mean / raw:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

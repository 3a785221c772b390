"""`make gpu-check`: every GPU check in one prepared run, so that the first call on a lent GPU
machine (Python 3.12 and torch, no package registry, 64 MiB carried per call) has to succeed once.

    python -m benchmarks.gpu_check prepare       here (`make gpu-wheels`): the wheels downloaded and
                                                 packed into .gpu-wheels/part-NN/, one folder per call
    python -m benchmarks.gpu_check verify        which parts are here and intact (each carrying call)
    python -m benchmarks.gpu_check run --out DIR [--cpu-dry-run]      (`make gpu-check OUT=DIR`)

`run` on the GPU host joins and verifies the parts and installs the wheels offline into
.gpu-check/site (pip --target --no-deps: exactly the set resolved here; the host's torch,
torchvision, onnx and scikit-learn serve as they are; a rerun with the same parts reuses it).
Then benchmarks.gpu_check_steps' checks run in order, each in its own process group with a time
limit, all within --budget-s: a step that fails or runs out of time is recorded and the next runs.
DIR/report.md and DIR/report.json are rewritten after every step, so a run cut short still leaves
them; DIR/steps.log holds each step's output and the server's log, DIR/bench/ the benchmark's
files: at most 8 files, as the device tool brings back. Exit code 1 if any step failed.

--cpu-dry-run checks all of it here: this environment as it is (nothing joined or installed),
STEPNET_DEVICE=cpu and the CPU provider, no GPU gauges, and the bench's GPU part allowed to skip.

Standard library only until the steps run: it starts before anything is installed.
"""

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import wheel_chunks

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".gpu-check"            # the joined wheels and the installed site, kept for a rerun
LOG_TAIL = 200_000                    # bytes of each log kept in steps.log


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: float      # its own time limit
    reserve_s: float    # kept for it when the steps before it run long


INSTALL = Step("install", 150, 0)
STEPS = (Step("environment", 90, 20), Step("bench", 300, 60), Step("serve", 150, 45),
         Step("fp16-parity", 120, 30))


def machine() -> dict:
    """What the report is about, from the standard library and nvidia-smi."""
    info: dict = {"hostname": platform.node(), "os": platform.platform(), "cores": len(os.sched_getaffinity(0)),
                  "python": platform.python_version(), "executable": sys.executable}
    if shutil.which("nvidia-smi") is None:
        info["nvidia_smi"] = "no nvidia-smi on this machine"
        return info
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"]
    for key, argv in (("nvidia_smi", ["nvidia-smi"]), ("gpus", query)):
        try:
            info[key] = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info[key] = f"nvidia-smi failed: {exc}"
    return info


def cuda_library_dirs() -> list[str]:
    """The NVIDIA wheels' library folders (nvidia/cu13/lib, nvidia/cudnn/lib, ...) of this Python,
    where the host's torch keeps CUDA and cuDNN: onnxruntime-gpu's CUDA provider loads them through
    the loader path, as in the Dockerfile."""
    roots = dict.fromkeys([*site.getsitepackages(), *sys.path])
    return sorted({d for root in roots if root for d in glob.glob(os.path.join(root, "nvidia", "*", "lib"))
                   if os.path.isdir(d)})


def step_environment(installed: Path | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    python_path = [str(installed)] if installed else []
    python_path += [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    libraries = cuda_library_dirs() + list(filter(None, env.get("LD_LIBRARY_PATH", "").split(os.pathsep)))
    if libraries:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(libraries))
    return env


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group (a server it started included), SIGKILL to what is left."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if wait:
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass


def bounded(argv: list[str], env: dict[str, str], timeout: float, log_path: Path) -> tuple[int | None, bool]:
    """(exit code, timed out): argv in a process group of its own, output appended to log_path."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout), False
        except subprocess.TimeoutExpired:
            return None, True
        finally:
            _stop_group(proc)


def _tail(path: Path, lines: int = 6) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def install(work: Path, parts: Path, timeout: float, log_path: Path) -> dict:
    """The parts joined and verified, the wheels installed into work/site; reused when work/site
    holds the same archive already."""
    try:
        manifest = wheel_chunks.read_manifest(parts)
        installed, stamp = work / "site", work / "site" / ".archive-sha256"
        details = {"wheels": len(manifest["wheels"]), "chunks": len(manifest["chunks"]),
                   "archive_bytes": manifest["archive"]["bytes"], "site": str(installed)}
        if stamp.is_file() and stamp.read_text() == manifest["archive"]["sha256"]:
            return {"status": "passed", "reason": "", "checks": {"reused": True}, "details": details}
        started = time.monotonic()
        _, wheels = wheel_chunks.join(parts, work / "join")
        details["join_s"] = round(time.monotonic() - started, 1)
    except wheel_chunks.ChunkError as exc:
        return {"status": "failed", "reason": str(exc), "checks": {"chunks_intact": False}, "details": {}}
    shutil.rmtree(installed, ignore_errors=True)
    argv = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
            "--disable-pip-version-check", "--target", str(installed), *map(str, wheels)]
    code, timed_out = bounded(argv, dict(os.environ), max(10.0, timeout - details["join_s"]), log_path)
    shutil.rmtree(work / "join", ignore_errors=True)
    checks = {"chunks_intact": True, "pip_install": code == 0}
    if code == 0:
        stamp.write_text(manifest["archive"]["sha256"])
        return {"status": "passed", "reason": "", "checks": checks, "details": details}
    why = "timed out" if timed_out else f"exited with {code}"
    return {"status": "failed", "reason": f"pip install {why}: {_tail(log_path)}", "checks": checks,
            "details": details}


def run_step(step: Step, mode: str, out: Path, logs: Path, env: dict[str, str], timeout: float,
             bench_quick: bool) -> dict:
    result_path = logs / f"{step.name}.result.json"
    argv = [sys.executable, "-m", "benchmarks.gpu_check_steps", step.name, "--mode", mode, "--out", str(out),
            "--logs", str(logs), "--result", str(result_path), "--seconds", str(round(timeout))]
    code, timed_out = bounded(argv + (["--bench-quick"] if bench_quick else []), env, timeout,
                              logs / f"{step.name}.log")
    if result_path.is_file():
        return json.loads(result_path.read_text())
    why = f"timed out after {timeout:.0f} s" if timed_out else f"exited with {code} before its result"
    return {"status": "failed", "reason": f"{why}: {_tail(logs / f'{step.name}.log')}", "checks": {},
            "details": {}}


def _markdown(report: dict) -> str:
    steps = report["steps"]
    failed = [s["name"] for s in steps if s["status"] == "failed"]
    state = ("running" if report["passed"] is None else "passed" if report["passed"]
             else f"FAILED ({', '.join(failed)})")
    lines = [f"# GPU check: {state}", "",
             f"Mode `{report['mode']}`, started {report['started']}, {report['seconds']} s of a "
             f"{report['budget_s']} s budget. Every step's output: steps.log; the benchmark's files: bench/.", "",
             "| step | status | seconds | limit s | reason |", "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit_s']} | {s['reason'] or ''} |"
              for s in steps]
    host = report["machine"]
    lines += ["", "## Machine", "", *[f"- {k}: {v}" for k, v in host.items() if k != "nvidia_smi"],
              "", "```", host.get("nvidia_smi", ""), "```"]
    for s in steps:
        lines += ["", f"## {s['name']}: {s['status']}", ""]
        lines += [f"- check {name}: {'yes' if ok else '**no**'}" for name, ok in s.get("checks", {}).items()]
        lines += [f"- {key}: {value if isinstance(value, str) else json.dumps(value, default=str)}"
                  for key, value in s.get("details", {}).items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path, logs: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(_markdown(report))
    order = [INSTALL.name, *(s.name for s in STEPS)]

    def rank(path: Path) -> tuple[int, str]:         # serve-server.log after serve.log
        return next((i for i, name in enumerate(order) if path.stem.startswith(name)), len(order)), path.name

    files = sorted(logs.glob("*.log"), key=rank)
    with open(out / "steps.log", "w") as f:
        for path in files:
            data = path.read_bytes()
            cut = f" (last {LOG_TAIL} of {len(data)} bytes)" if len(data) > LOG_TAIL else ""
            f.write(f"===== {path.name}{cut} =====\n{data[-LOG_TAIL:].decode(errors='replace')}\n")


def run(out: Path, dry_run: bool, budget_s: float, bench_quick: bool, parts: Path = wheel_chunks.PARTS) -> int:
    started = time.monotonic()
    deadline = started + budget_s
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="gpu-check-logs-"))
    mode = "cpu-dry-run" if dry_run else "gpu"
    report: dict = {"mode": mode, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                    "budget_s": budget_s, "seconds": 0, "passed": None, "machine": machine(), "steps": []}

    def record(step: Step, result: dict, step_started: float, limit: float) -> None:
        report["steps"].append({"name": step.name, "seconds": round(time.monotonic() - step_started, 1),
                                "limit_s": round(limit), **result})
        report["seconds"] = round(time.monotonic() - started, 1)
        write_report(report, out, logs)

    try:
        installed = None
        if dry_run:
            record(INSTALL, {"status": "skipped", "reason": "--cpu-dry-run: this environment as it is",
                             "checks": {}, "details": {}}, time.monotonic(), 0)
        else:
            limit = min(INSTALL.limit_s, deadline - time.monotonic() - sum(s.reserve_s for s in STEPS))
            step_started = time.monotonic()
            record(INSTALL, install(WORK, parts, limit, logs / "install.log"), step_started, limit)
            installed = WORK / "site"
        env = step_environment(installed)
        report["machine"]["ld_library_path_added"] = cuda_library_dirs()
        for i, step in enumerate(STEPS):
            reserve = sum(s.reserve_s for s in STEPS[i + 1:])
            limit = max(step.reserve_s, min(step.limit_s, deadline - time.monotonic() - reserve))
            step_started = time.monotonic()
            record(step, run_step(step, mode, out, logs, env, limit, bench_quick), step_started, limit)
        report["passed"] = not any(s["status"] == "failed" for s in report["steps"])
        report["seconds"] = round(time.monotonic() - started, 1)
        write_report(report, out, logs)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return 0 if report["passed"] else 1


def prepare(chunk_mib: float | None, preset: int) -> int:
    resolved, alone = wheel_chunks.requirements()
    tree = wheel_chunks.tree_bytes()
    limit = int(chunk_mib * wheel_chunks.MiB) if chunk_mib else wheel_chunks.chunk_limit(tree)
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-download-") as tmp:
        wheels = wheel_chunks.download(Path(tmp), resolved, alone)
        downloaded = sum(w.stat().st_size for w in wheels)
        manifest = wheel_chunks.pack(wheels, wheel_chunks.PARTS, limit, preset, extra={
            "python_version": wheel_chunks.PYTHON_VERSION, "platforms": list(wheel_chunks.PLATFORMS),
            "requirements": resolved, "no_deps": alone, "tree_bytes": tree,
            "created": datetime.datetime.now().isoformat(timespec="seconds")})
    mib = wheel_chunks.MiB
    chunks = manifest["chunks"]
    print(f"{wheel_chunks.PARTS.name}/: {len(wheels)} wheels, {downloaded / mib:.1f} MiB as downloaded, "
          f"{manifest['archive']['bytes'] / mib:.1f} MiB packed in {len(chunks)} chunks of at most "
          f"{limit / mib:.1f} MiB (the working tree weighs {tree / mib:.1f} MiB).")
    print("On the GPU host, one device call per part, in a row (the machine stays warm 30 s):")
    for chunk in chunks[:-1]:
        print(f"  carry [\"{wheel_chunks.PARTS.name}/{chunk['part']}\"], command: python3 -m benchmarks.gpu_check verify")
    print(f"  carry [\"{wheel_chunks.PARTS.name}/{chunks[-1]['part']}\"], command: make gpu-check OUT=$OUT")
    return 0


def verify(parts: Path, complete: bool) -> int:
    try:
        status = wheel_chunks.check_parts(parts)
    except wheel_chunks.ChunkError as exc:
        print(f"gpu_check verify: {exc}", file=sys.stderr)
        return 1
    print(f"intact: {', '.join(status.intact) or 'none'}; missing: {', '.join(status.missing) or 'none'}")
    for problem in status.corrupt:
        print(f"corrupt: {problem}", file=sys.stderr)
    return 1 if status.corrupt or (complete and status.missing) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download and pack the wheels into .gpu-wheels/part-NN/")
    p.add_argument("--chunk-mib", type=float, help="chunk size (default: what travels beside the working tree, "
                                                   "at most 59 MiB)")
    p.add_argument("--preset", type=int, default=6, help="xz preset (default 6)")
    p = sub.add_parser("verify", help="which parts are here and intact")
    p.add_argument("--complete", action="store_true", help="fail unless every part is here")
    p = sub.add_parser("run", help="install the wheels, then every check; the report in --out")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-dry-run", action="store_true", help="here: this environment, the CPU provider")
    p.add_argument("--budget-s", type=float, default=450, help="the whole run's time (default 450)")
    p.add_argument("--bench-quick", action="store_true", help="stepnet bench --quick on the GPU too")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.chunk_mib, args.preset)
    if args.command == "verify":
        return verify(wheel_chunks.PARTS, args.complete)
    return run(args.out, args.cpu_dry_run, args.budget_s, args.bench_quick)


if __name__ == "__main__":
    sys.exit(main())

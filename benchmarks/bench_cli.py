"""Wall time of `gantk generate` as a user runs it (a fresh process: imports, start-up, the parity check
and the writing), the installed gantk (this checkout, installed editable by `make`) against a git
revision, interleaved. Per run: wall and CPU seconds (the process and its workers), generate's timed
phase (`seconds` in its summary) and what came before it.

    python benchmarks/bench_cli.py --before REV --model M [--count 10000] [--rounds 3] [-- generate options]

The revision's `toolkit/` and `exporters/` are laid out as a `gantk` package in a temp folder that
PYTHONPATH puts ahead of the editable install. Every run writes into a new folder, all removed at the
end: deleting thousands of files slows the next file creations on ext4 for about 6 minutes
(BENCHMARKS.md). Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision to compare with")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, default=None,
                   help="scratch folder on the disk to measure [default: a temp dir]")
    p.add_argument("extra", nargs="*", help="more generate options, after --")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="gantk-cli-", dir=a.work) as tmp:
        work = Path(tmp)
        envs = {"before": _tree(a.before, work / "before"), "after": None}
        walls: dict[str, list[float]] = {k: [] for k in envs}
        cpus: dict[str, list[float]] = {k: [] for k in envs}
        print(f"# bench_cli {time.strftime('%Y-%m-%d %H:%M')}: {os.cpu_count()} cores, load "
              f"{os.getloadavg()[0]:.2f}; generate --count {a.count} {' '.join(a.extra)}; before = {a.before}")
        print(f"{'round':<6}{'tree':<8}{'wall s':>8}{'cpu s':>7}{'timed s':>9}{'before it':>10}")
        for r in range(a.rounds):
            for k in list(envs)[r % 2:] + list(envs)[:r % 2]:
                out = work / f"out-{k}-{r}"
                wall, cpu, s = _run(a, out, envs[k])
                walls[k].append(wall)
                cpus[k].append(cpu)
                print(f"{r:<6}{k:<8}{wall:>8.2f}{cpu:>7.2f}{s['seconds']:>9.2f}{wall - s['seconds']:>10.2f}",
                      flush=True)
        med = {k: statistics.median(v) for k, v in walls.items()}
        print(f"median wall: before {med['before']:.2f} s, after {med['after']:.2f} s: "
              f"after / before x{med['before'] / med['after']:.3f} in speed; median CPU: before "
              f"{statistics.median(cpus['before']):.2f} s, after {statistics.median(cpus['after']):.2f} s")


def _tree(rev: str, dest: Path) -> dict[str, str]:
    """The environment that runs revision `rev`'s gantk."""
    src = dest / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "toolkit", "exporters"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = dest / "pkg" / "gantk"
    shutil.copytree(src / "toolkit", pkg)
    shutil.copytree(src / "exporters", pkg / "exporters")
    return {**os.environ, "PYTHONPATH": str(dest / "pkg")}


def _run(a, out: Path, env: dict[str, str] | None) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "gantk", "generate", "--model", str(a.model), "--out", str(out),
           "--count", str(a.count), "-q", "--json", *a.extra]
    t0, c0 = time.perf_counter(), _children_cpu()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    return wall, cpu, json.loads(r.stdout)


def _children_cpu() -> float:
    """CPU seconds of the finished child processes, with their own children (the workers)."""
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


if __name__ == "__main__":
    main()

"""onnxruntime on the CPU: intra-op threads against concurrent 1-thread streams, pure inference and
`generate --count N` end to end (PNG and npy), interleaved rounds, medians.

    python benchmarks/bench_streams.py --model runs/<run>/export/generator.onnx [--count 10000] [--rounds 3]

Prints figures, asserts nothing: compare ratios within one run. Each (threads, streams) plan runs once
per round, the order rotated each round; every output folder stays until the end (see
`gantk.bench._end_to_end_rows`: on ext4 without a journal, deletions slow the file creations after them).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from interleave import median_rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a gantk ONNX export")
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    plans = sorted({(1, 1), (cores, 1), (1, cores)})  # (intra-op threads, streams)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {cores} cores, load {os.getloadavg()[0]:.2f}; {a.model}")
    print("# plan = streams x intra-op threads, as in gantk bench; img/s medians of", a.rounds, "interleaved rounds\n")
    pure = _pure(a.model, plans, a.rounds)
    e2e = _end_to_end(a.model, plans, a.count, a.rounds)
    print(f"{'plan':<8}{'pure b256':>11}{'png e2e':>10}{'npy e2e':>10}   runs (png | npy)")
    for plan in plans:
        png, npy = e2e[(plan, "png")], e2e[(plan, "npy")]
        print(f"{plan[1]}x{plan[0]:<6}{pure[plan]:>11.0f}{statistics.median(png):>10.0f}{statistics.median(npy):>10.0f}"
              f"   {' '.join(f'{v:.0f}' for v in png)} | {' '.join(f'{v:.0f}' for v in npy)}")


def _pure(model: Path, plans, rounds: int) -> dict:
    from gantk.backends import open_backend

    runs = {plan: open_backend("onnxruntime", model, provider="cpu", threads=plan[0], streams=plan[1])
            for plan in plans}
    z = np.random.default_rng(0).standard_normal((256, *runs[plans[0]].latent_shape), dtype=np.float32)
    return median_rates({plan: lambda be=be: len(be(z)) for plan, be in runs.items()}, rounds=rounds, seconds=1.0)


def _end_to_end(model: Path, plans, count: int, rounds: int) -> dict:
    from gantk.generate import Request, generate

    keys = [(plan, fmt) for fmt in ("png", "npy") for plan in plans]
    rates: dict = {k: [] for k in keys}
    with tempfile.TemporaryDirectory(prefix="gantk-streams-") as tmp:
        for r in range(rounds):
            for plan, fmt in keys[r % len(keys):] + keys[:r % len(keys)]:
                out = Path(tmp) / f"{fmt}-{plan[1]}x{plan[0]}-{r}"  # kept till the end: see bench._end_to_end_rows
                s = generate(Request(out=out, count=count, fmt=fmt), model=model, provider="cpu",
                             threads=plan[0], streams=plan[1])
                rates[(plan, fmt)].append(s["images_per_s"])
    return rates


if __name__ == "__main__":
    main()

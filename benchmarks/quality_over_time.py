"""Quality of a run's generator after N minutes of training, scored by `gantk eval`'s metrics.

Train with numbered checkpoints often enough, e.g.
    gantk train --data ../shared/data/mnist/t10k-images-idx3-ubyte.gz --checkpoint-every 300 --keep 100
then, for each mark, the newest checkpoint whose training time (metrics.csv elapsed_s) is within it:
    .venv/bin/python benchmarks/quality_over_time.py RUN_DIR [RUN_DIR ...] --classifier clf.pt \
        --reference ../shared/data/mnist/t10k-images-idx3-ubyte.gz --minutes 1,5,15 [--count 2000]
Prints one Markdown table row per (run, mark), and the held-out real row.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from gantk.evaluate import evaluate


def checkpoint_at(run: Path, minutes: float) -> tuple[Path, int, float] | None:
    """The newest numbered checkpoint of `run` reached within `minutes` of training time."""
    elapsed = {int(r["step"]): float(r["elapsed_s"]) for r in csv.DictReader(open(run / "metrics.csv"))}
    best = None
    for path in sorted((run / "checkpoints").glob("step-*.pt")):
        step = int(path.stem.split("-")[1])
        seconds = elapsed.get(step)
        if seconds is not None and seconds <= minutes * 60:
            best = (path, step, seconds)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--minutes", default="1,5,15")
    ap.add_argument("--count", type=int, default=2000)
    a = ap.parse_args()
    picks = []
    for run in a.runs:
        for m in (float(v) for v in a.minutes.split(",")):
            hit = checkpoint_at(run, m)
            if hit:
                picks.append((run.name, m, *hit))
    doc = evaluate([p[2] for p in picks], classifier=a.classifier, reference=a.reference, count=a.count,
                   heldout=2000)
    print("| run | minutes | step | train s | FID | KID x1e3 | confidence | entropy | precision | recall | memorised |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [(name, f"{m:g}", str(step), f"{sec:.0f}", r) for (name, m, _, step, sec), r in zip(picks, doc["rows"])]
    rows.append(("real held-out digits", "", "", "", doc["real_heldout"]))
    for name, m, step, sec, r in rows:
        print(f"| {name} | {m} | {step} | {sec} | {r['fid']:.1f} | {1e3 * r['kid']:.1f} ± {1e3 * r['kid_se']:.1f} | "
              f"{r['confidence']:.3f} | {r['class_entropy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['memorised']:.3f} |")


if __name__ == "__main__":
    main()

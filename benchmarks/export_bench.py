"""Export benchmark: time, file size and parity of every format/dtype for the given checkpoints.

    python benchmarks/export_bench.py runs/00000-seed-*/checkpoints/last.pt runs/00001-dcgan-*/... \
        --out-dir /tmp/export-bench

Prints one markdown table. Export seconds include tracing, saving, the checker and validation at
batch 1, 7 and 256 (the validation share is its own column). The first export in a process also pays
for torch.export's warm-up, so each export runs `--repeat` times and the fastest is shown.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from gantk.exporters import EXPORTERS, Source

CASES = (("onnx", "fp32"), ("onnx", "fp16"), ("torchscript", "fp32"))


def bench(ckpt: Path, out_dir: Path, *, repeat: int) -> list[dict]:
    src = Source.from_checkpoint(ckpt)
    rows = []
    for fmt, dtype in CASES:
        out = out_dir / f"{src.arch}-{fmt}-{dtype}{'.onnx' if fmt == 'onnx' else '.pt'}"
        reports = [EXPORTERS[fmt](src, out, dtype=dtype) for _ in range(repeat)]
        rows.append({"arch": src.arch, "step": src.step, **vars(min(reports, key=lambda r: r.seconds))})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/gantk-export-bench"))
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    print("| arch (step) | format | dtype | export s | of which validate s | size MB | max abs diff | "
          "mean abs diff | uint8 pixels off |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ckpt in a.checkpoints:
        for r in bench(ckpt, a.out_dir, repeat=a.repeat):
            print(f"| {r['arch']} ({r['step']}) | {r['format']} | {r['dtype']} | {r['seconds']:.2f} | "
                  f"{r['validate_seconds']:.2f} | {r['size_bytes'] / 1e6:.2f} | {r['max_abs_diff']:.2e} | "
                  f"{r['mean_abs_diff']:.2e} | {100 * r['pixels_off']:.3f}% |")


if __name__ == "__main__":
    main()

"""The PNG writer before and after, in one run: Pillow's encode with zlib's default strategy (before) and
Z_RLE (after), a file written by path as temp + rename (before) and unnamed with O_TMPFILE in the
folder a worker holds open, then linked (after);
each alone on the model's own images (us per image, the best of 3 passes), then `generate --count N`
end to end (onnxruntime, its defaults) with the old writer and the new, beside the seed-style baseline,
interleaved rounds, medians. Output folders stay until the end: on ext4 without a journal, deleting
thousands of files slows the file creations of the next minute.

    .venv/bin/python benchmarks/bench_png_writer.py --checkpoint runs/<run>/checkpoints/last.pt [--count 10000]
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--model", type=Path, help="its ONNX export [default: runs/<run>/export/generator.onnx]")
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--work", type=Path, default=Path("."), help="folder for the scratch outputs")
    a = p.parse_args()
    onnx = a.model or a.checkpoint.parent.parent / "export" / "generator.onnx"

    from gantk import generate as gen
    from gantk.backends import open_backend

    backend = open_backend("onnxruntime", onnx, provider="cpu")
    px = gen.to_pixels(backend(gen.noise(0, range(2000), backend.latent_shape)))
    work = Path(tempfile.mkdtemp(prefix="bench-png-writer-", dir=a.work))
    try:
        print(f"{onnx}: {len(px)} of its images, {os.cpu_count()} cores")
        _parts(gen, px, work)
        _end_to_end(gen, a, onnx, work)
    finally:
        shutil.rmtree(work)


def _default_strategy(px: np.ndarray) -> bytes:
    """gantk's encode before: Pillow, zlib level 6, default strategy."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(px, "L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _temp_rename(path: Path, data: bytes, dir_fd: int | None = None) -> None:
    """gantk's file write before: a temp file beside `path`, by path, then os.replace."""
    tmp = path.with_name(f".tmp-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _best_us(fn, items) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return best / len(items) * 1e6


def _parts(gen, px: np.ndarray, work: Path) -> None:
    from PIL import Image

    for name, enc in (("encode, default strategy (before)", _default_strategy),
                      ("encode, Z_RLE (after)", gen.encode_png)):
        size = np.mean([len(enc(p)) for p in px])
        print(f"{name:<40} {_best_us(enc, px):6.1f} us   mean {size:5.0f} bytes")
    same = all(np.array_equal(np.asarray(Image.open(io.BytesIO(gen.encode_png(p)))), p) for p in px)
    print(f"Z_RLE files decode to the same pixels: {same}")

    data = [gen.encode_png(p) for p in px]
    variants = (("write, temp + rename (before)", _temp_rename),
                ("write, O_TMPFILE + link (after)", gen._write_atomic))
    for v, (name, write) in enumerate(variants):
        rounds = []
        for r in range(3):
            folder = work / f"files-{v}-{r}"
            folder.mkdir()
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # as a PNG worker holds it
            t0 = time.perf_counter()
            for i, d in enumerate(data):
                write(folder / gen.file_name(i), d, dir_fd)
            rounds.append((time.perf_counter() - t0) / len(data) * 1e6)
            os.close(dir_fd)
        print(f"{name:<40} {min(rounds):6.1f} us   (each pass: {' '.join(f'{x:.1f}' for x in rounds)})")


def _end_to_end(gen, a, onnx: Path, work: Path) -> None:
    from gantk.bench import end_to_end, seed_style_baseline
    from gantk.checkpoint import generator_from, load

    g = generator_from(load(a.checkpoint)).eval()
    before = {"encode_png": _default_strategy, "_write_atomic": _temp_rename}
    runs = {"seed-style baseline": lambda out: seed_style_baseline(g, out=out, count=a.count),
            "writer before": lambda out: _patched_run(gen, before, onnx, out, a.count, end_to_end),
            "writer after": lambda out: end_to_end(onnx, "onnxruntime", out=out, count=a.count)}
    rates: dict[str, list[float]] = {k: [] for k in runs}
    keys = list(runs)
    for r in range(a.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            rates[k].append(runs[k](work / f"e2e-{keys.index(k)}-{r}")["images_per_s"])
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\ngenerate --count {a.count} to PNGs, {a.rounds} interleaved rounds, medians")
    for k in keys:
        print(f"{k:<22} {med[k]:7,.0f} img/s  x{med[k] / med['seed-style baseline']:.2f} the baseline   "
              f"(each round: {' '.join(f'{x:.0f}' for x in rates[k])})")
    print(f"writer after / before: x{med['writer after'] / med['writer before']:.3f}")


def _patched_run(gen, attrs, onnx, out, count, end_to_end):
    with mock.patch.multiple(gen, **attrs):
        return end_to_end(onnx, "onnxruntime", out=out, count=count)


if __name__ == "__main__":
    main()

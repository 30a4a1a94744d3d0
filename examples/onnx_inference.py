"""Batch inference on a gantk ONNX export with numpy and onnxruntime only (no torch, no gantk).

    python examples/onnx_inference.py runs/<run>/export/generator.onnx --count 64 --out grid.png

Reads the latent shape from the file's metadata, draws standard-normal noise with numpy, runs the
model in batches, turns outputs in [-1, 1] into uint8 pixels with round((x + 1) * 127.5), and writes
the digits as one PNG grid (Pillow).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import onnxruntime as ort
from PIL import Image


def load(path: str, *, provider: str) -> tuple[ort.InferenceSession, dict[str, str]]:
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(path, providers=providers)
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("kind") != "gantk-generator":
        raise SystemExit(f"{path}: not a gantk generator export")
    return session, meta


def generate(session: ort.InferenceSession, meta: dict[str, str], *, count: int, seed: int,
             batch_size: int) -> np.ndarray:
    """uint8 pixels (count, 32, 32)."""
    latent = json.loads(meta["latent_shape"])
    z = np.random.default_rng(seed).standard_normal((count, *latent), dtype=np.float32)
    outs = [session.run([meta["output_name"]], {meta["input_name"]: z[i:i + batch_size]})[0]
            for i in range(0, count, batch_size)]
    x = np.concatenate(outs)[:, 0]                                  # (count, 32, 32) in [-1, 1]
    return np.clip(np.round((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(pixels: np.ndarray, *, pad: int = 2) -> Image.Image:
    n, h, w = pixels.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return Image.fromarray(canvas, mode="L")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a gantk .onnx export")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="onnx_grid.png")
    a = p.parse_args()
    session, meta = load(a.model, provider=a.provider)
    t0 = time.perf_counter()
    pixels = generate(session, meta, count=a.count, seed=a.seed, batch_size=a.batch_size)
    seconds = time.perf_counter() - t0
    grid(pixels).save(a.out)
    print(json.dumps({"model": a.model, "arch": meta.get("arch"), "count": a.count, "seconds": round(seconds, 4),
                      "providers": session.get_providers(), "out": a.out}))


if __name__ == "__main__":
    main()

"""Batch inference on a gantk TorchScript export with torch only (no gantk, no numpy, no Pillow).

    python examples/torchscript_inference.py runs/<run>/export/generator.pt --count 64 --out grid.png

Reads gantk's metadata from the file's `_extra_files`, draws standard-normal noise with a seeded
torch.Generator, runs the model in batches, turns outputs in [-1, 1] into uint8 pixels with
round((x + 1) * 127.5), and writes one PNG grid with the standard library's zlib.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import time
import warnings
import zlib

import torch

# torch 2.14+ marks torch.jit deprecated; loading TorchScript still works and is what this example shows.
warnings.filterwarnings("ignore", r".*is deprecated", FutureWarning, r"torch\.jit")


def load(path: str, *, device: str) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    extra = {"gantk.json": ""}
    module = torch.jit.load(path, map_location=device, _extra_files=extra)
    meta = json.loads(extra["gantk.json"] or "{}")
    if meta.get("kind") != "gantk-generator":
        raise SystemExit(f"{path}: not a gantk generator export")
    return module, meta


@torch.inference_mode()
def generate(module, meta: dict[str, str], *, count: int, seed: int, batch_size: int, device: str) -> torch.Tensor:
    """uint8 pixels (count, 32, 32) on the CPU."""
    latent = json.loads(meta["latent_shape"])
    z = torch.randn((count, *latent), generator=torch.Generator().manual_seed(seed))
    outs = [module(z[i:i + batch_size].to(device)).cpu() for i in range(0, count, batch_size)]
    x = torch.cat(outs)[:, 0]                                       # (count, 32, 32) in [-1, 1]
    return torch.round((x.double() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)


def grid(pixels: torch.Tensor, *, pad: int = 2) -> torch.Tensor:
    n, h, w = pixels.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=torch.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return canvas


def write_png(gray: torch.Tensor, path: str) -> None:
    """An 8-bit grayscale PNG: signature, IHDR, one zlib IDAT (filter byte 0 per row), IEND."""
    h, w = gray.shape
    raw = b"".join(b"\x00" + bytes(row.tolist()) for row in gray)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a gantk TorchScript export (.pt)")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="torchscript_grid.png")
    a = p.parse_args()
    module, meta = load(a.model, device=a.device)
    t0 = time.perf_counter()
    pixels = generate(module, meta, count=a.count, seed=a.seed, batch_size=a.batch_size, device=a.device)
    seconds = time.perf_counter() - t0
    write_png(grid(pixels), a.out)
    print(json.dumps({"model": a.model, "arch": meta.get("arch"), "count": a.count, "seconds": round(seconds, 4),
                      "device": a.device, "out": a.out}))


if __name__ == "__main__":
    main()

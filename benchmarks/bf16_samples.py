"""Digits from the bench's bf16 route (and eager fp32, same noise) as .npy files for `gantk eval`: what
bf16 costs in quality. (`gantk eval CKPT-bf16.pt`, the bf16 TorchScript export, scores the same module.)

    python benchmarks/bf16_samples.py --checkpoint CKPT --out DIR [--count 5000]
    gantk eval CKPT DIR/fp32-eager.npy DIR/bf16-route.npy --count 5000 --classifier CLF --reference REF

The noise is generate's (seed 0, indices 0..count-1), the noise `gantk eval` draws for CKPT itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    import torch

    from gantk.checkpoint import generator_from, load
    from gantk.exporters.fold import channels_last
    from gantk.generate import noise, to_pixels

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=5000)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    g = generator_from(load(a.checkpoint)).eval()
    z = torch.from_numpy(noise(0, range(a.count), tuple(g.latent_shape)))
    images = {}
    with torch.inference_mode():
        for name, m in (("fp32-eager", g), ("bf16-route", channels_last(g, dtype="bf16"))):
            images[name] = np.concatenate([to_pixels(m(z[i:i + 500]).float().numpy())
                                           for i in range(0, a.count, 500)]).reshape(a.count, 32, 32)
            np.save(a.out / f"{name}.npy", images[name])
    d = np.abs(images["fp32-eager"].astype(np.int16) - images["bf16-route"].astype(np.int16))
    print(f"{a.count} images in {a.out}: bf16 moves {(d > 0).mean():.2%} of pixels, {(d > 1).mean():.3%} by more "
          f"than one level, at most {d.max()}")


if __name__ == "__main__":
    main()

"""Where bf16 inference moves pixels: each conv of the (BatchNorm-folded) generator in bf16 alone, all of
them, all but the first and last, and the weights rounded to bf16 with fp32 arithmetic; uint8 levels
off against fp32 on the same noise.

    python benchmarks/bf16_levels.py --checkpoint runs/<run>/checkpoints/last.pt [--count 2048]
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--count", type=int, default=2048)
    a = p.parse_args()

    from gantk.checkpoint import generator_from, load
    from gantk.exporters.fold import fold_batchnorm
    from gantk.generate import noise, to_pixels

    g = fold_batchnorm(generator_from(load(a.checkpoint)).eval())
    z = torch.from_numpy(noise(0, range(a.count), tuple(g.latent_shape)))
    with torch.no_grad():
        ref = to_pixels(g(z).numpy()).astype(np.int16)
    convs = [i for i, m in enumerate(g.net) if isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.Conv2d))]

    def report(name: str, out: torch.Tensor) -> None:
        d = np.abs(to_pixels(out.numpy()).astype(np.int16) - ref)
        print(f"{name:<34} max levels {d.max():>2}   pixels off {(d > 0).mean():7.3%}   >1 level {(d > 1).mean():7.3%}")

    def in_bf16(layers: set[int]) -> torch.Tensor:
        x = z
        with torch.no_grad():
            for i, m in enumerate(copy.deepcopy(g.net)):
                x = m.to(torch.bfloat16)(x.to(torch.bfloat16)).float() if i in layers else m(x)
        return x

    print(f"{a.checkpoint}: layers {[type(m).__name__ for m in g.net]}, {a.count} images")
    for c in convs:
        report(f"only layer {c} in bf16", in_bf16({c}))
    report("every conv in bf16", in_bf16(set(convs)))
    report("all but the first and last in bf16", in_bf16(set(convs[1:-1])))
    rounded = copy.deepcopy(g)
    with torch.no_grad():
        for m in rounded.net:
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(m.weight.bfloat16().float())
        report("weights rounded to bf16, fp32 math", rounded(z))


if __name__ == "__main__":
    main()

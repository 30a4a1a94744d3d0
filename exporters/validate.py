"""Validation shared by every exporter: the export against the eager generator on fixed noise.

The eager generator runs once on 256 fixed noise vectors (float32, CPU). The export runs on the first
1, 7 and 256 of them, and each of its outputs is compared with the same rows of the eager output. An
export whose image i depends on the batch it sits in (a batch axis frozen at tracing, training-mode
BatchNorm) cannot match at every size, so it fails here. Figures: max and mean absolute difference,
and the share of uint8 pixels that differ after round((x + 1) * 127.5).

Tolerances (max absolute difference on outputs in [-1, 1]):
  fp32: 1e-4. Folding BatchNorm and reordering sums move outputs by about 1e-7.
  fp16: 1e-2. Weights and activations rounded to half precision (11-bit mantissa). Measured on the
        seed generator after 400 steps: ONNX Runtime CPU 5e-4 max (it runs fp16 Conv through fp32
        casts), torch computing in fp16 throughout 1.6e-3 max, which is what a GPU's fp16 kernels
        come close to; 1e-2 leaves room for that and still fails a wrong weight. Figures: BENCHMARKS.md.
  bf16: 4e-2 (about 5 uint8 levels). bf16 keeps 8 mantissa bits; with the first layer in fp32 the
        MNIST dcgan (8 epochs) measured 1.5e-2 max, pixels up to 2-3 levels off. Only that model was
        measured: a deeper trained stack (the seed architecture) may need --atol. A BatchNorm fold
        without its shift on the dcgan gave 9e-2 and fails.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gantk.errors import UsageError, VerificationError

BATCH_SIZES = (1, 7, 256)
NOISE_SEED = 12345
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 4e-2}

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Parity:
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    pixels_off: float
    batch_consistency: float
    atol: float
    seconds: float
    per_batch: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol

    def summary(self) -> str:
        worst = max(self.per_batch, key=lambda n: self.per_batch[n]["max_abs_diff"])
        return (f"max abs diff {self.max_abs_diff:.3g} (atol {self.atol:.3g}, worst at batch {worst}), "
                f"mean {self.mean_abs_diff:.3g}, {100 * self.pixels_off:.4g}% uint8 pixels off, "
                f"batch consistency {self.batch_consistency:.3g}")


def tolerance(dtype: str, atol: float | None) -> float:
    """`atol` when given (finite, >= 0; 0 asks for bit-exact outputs), else the dtype's documented default."""
    if atol is None:
        return TOLERANCE[dtype]
    if not 0 <= atol < float("inf"):
        raise UsageError(f"--atol must be a finite number >= 0, got {atol}")
    return float(atol)


def fixed_noise(latent_shape: tuple[int, ...], *, count: int = max(BATCH_SIZES)) -> np.ndarray:
    """The same float32 standard-normal noise on every machine (numpy's PCG64, fixed seed)."""
    rng = np.random.default_rng(NOISE_SEED)
    return rng.standard_normal((count, *latent_shape), dtype=np.float32)


def to_pixels(x: np.ndarray) -> np.ndarray:
    """The pixels `gantk generate` writes, (N, 32, 32) uint8."""
    from ..generate import to_pixels as pixels

    return pixels(x)


def eager(generator, z: np.ndarray) -> np.ndarray:
    """The reference: the eager generator in float32 on CPU."""
    import torch

    g = generator.float().cpu().eval()
    with torch.no_grad():
        return g(torch.from_numpy(z)).numpy()


def compare(run: Runner, generator, *, atol: float, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> Parity:
    """Run the export at each batch size and compare with the eager generator; never raises on a mismatch."""
    t0 = time.perf_counter()
    z = fixed_noise(tuple(generator.latent_shape), count=max(batch_sizes))
    ref = eager(generator, z)
    outs = {n: _run(run, z[:n], ref[:n].shape, n) for n in batch_sizes}
    per_batch = {n: figures(out, ref[: len(out)]) for n, out in outs.items()}
    full = outs[max(batch_sizes)]
    consistency = max(_max_diff(out, full[: len(out)]) for out in outs.values())
    diffs = np.concatenate([_abs_diff(out, ref[: len(out)]).ravel() for out in outs.values()])
    pixels = np.concatenate([(to_pixels(out) != to_pixels(ref[: len(out)])).ravel() for out in outs.values()])
    return Parity(tuple(batch_sizes), float(diffs.max()), float(diffs.mean()), float(pixels.mean()),
                  consistency, atol, time.perf_counter() - t0, per_batch)


def check_rewrite(module, generator, *, what: str) -> None:
    """VerificationError unless a reduced-precision export's rewrites (BatchNorm folded, convs rewritten),
    run in fp32, match the eager generator at fp32's tolerance: rounding can hide a wrong rewrite inside
    fp16's or bf16's looser bound (a fold without its shift passed bf16's 4e-2 on a young seed model,
    whose outputs spanned 0.04)."""
    import torch

    def run(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(z)).numpy()

    parity = compare(run, generator, atol=TOLERANCE["fp32"], batch_sizes=(max(BATCH_SIZES),))
    require(parity, what=f"{what}: its rewrite, run in fp32,")


def require(parity: Parity, *, what: str) -> None:
    """VerificationError with the figures when `parity` is beyond tolerance."""
    if not parity.ok:
        raise VerificationError(f"{what} does not match the eager generator: {parity.summary()}")


def _run(run: Runner, z: np.ndarray, shape: tuple[int, ...], n: int) -> np.ndarray:
    try:
        out = np.asarray(run(np.ascontiguousarray(z)))
    except Exception as e:  # a frozen batch axis, an unsupported op: the export does not work at this size
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VerificationError(f"export failed at batch size {n}: {first[:300]}") from None
    if out.shape != shape:
        raise VerificationError(f"export returned shape {out.shape} at batch size {n}, expected {shape}")
    return out.astype(np.float32, copy=False)


def _abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return np.where(np.isfinite(d), d, np.inf)  # NaN must fail, not compare False


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(_abs_diff(a, b).max())


def figures(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Max and mean abs diff (non-finite: inf) and the share of uint8 pixels that differ."""
    d = _abs_diff(out, ref)
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "pixels_off": float((to_pixels(out) != to_pixels(ref)).mean())}

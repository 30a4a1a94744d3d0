"""Training-step speed of the default recipe under CPU/GPU speed options, interleaved in one run.

Variants: fp32 (gantk's default on CUDA and on CPUs without bf16 instructions), channels_last, bf16
autocast (CPU; the default where the CPU has bf16 instructions) or fp16 AMP (CUDA), and torch.compile.
On CUDA every variant runs with gantk's cuDNN settings (deterministic, no autotuning), and "fp32 cuDNN
defaults" with PyTorch's (any algorithm, no autotuning), to show what exact resume
costs. Each runs the same steps from the same initial weights and data; the table shows steps/s, the
ratio to fp32, and how far G's weights moved from fp32's after the steps (the price in results).

    .venv/bin/python benchmarks/bench_train_variants.py [--device cpu|cuda] [--steps 60] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from gantk import data, models


def make_step(g, d, *, autocast, channels_last: bool):
    og = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999))
    od = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def step(x, z):
        x = x.contiguous(memory_format=fmt)
        with autocast():
            fake = g(z)
            lr, lf = d(x), d(fake.detach())
            loss_d = F.binary_cross_entropy_with_logits(lr.float(), torch.full_like(lr, 0.9, dtype=torch.float32)) + \
                F.binary_cross_entropy_with_logits(lf.float(), torch.zeros_like(lf, dtype=torch.float32))
        od.zero_grad()
        loss_d.backward()
        od.step()
        with autocast():
            lg = d(fake)
            loss_g = F.binary_cross_entropy_with_logits(lg.float(), torch.ones_like(lg, dtype=torch.float32))
        og.zero_grad()
        loss_g.backward()
        og.step()

    return step


def variant(name: str, base_g, base_d, device: str):
    g, d = copy.deepcopy(base_g).to(device), copy.deepcopy(base_d).to(device)
    cl = name == "channels_last"
    if cl:
        g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    if name == "reduced precision":
        dtype = torch.bfloat16 if device == "cpu" else torch.float16
        autocast = lambda: torch.autocast(device, dtype)  # noqa: E731
    else:
        autocast = nullcontext
    run_g, run_d = (torch.compile(g), torch.compile(d)) if name == "torch.compile" else (g, d)
    step = make_step(run_g, run_d, autocast=autocast, channels_last=cl)
    deterministic = name != "fp32 cuDNN defaults"  # the rest as gantk train sets them on CUDA

    def with_cudnn(x, z):
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, False
        step(x, z)

    return g, with_cudnn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="fp32,channels_last,reduced precision,torch.compile")
    a = ap.parse_args()
    if a.device == "cuda":
        a.variants += ",fp32 cuDNN defaults"
    torch.manual_seed(0)
    base_g, base_d = models.build("dcgan")
    images = data.to_tensor(data.synthetic(32 * a.steps, seed=0).images).to(a.device)
    noise = torch.randn(a.steps, 32, *base_g.latent_shape, device=a.device)
    runs = {name: variant(name, base_g, base_d, a.device) for name in a.variants.split(",")}
    for name, (g, step) in runs.items():  # warm-up (and compilation) outside the timing
        t = time.perf_counter()
        step(images[:32], noise[0])
        print(f"warm-up {name}: {time.perf_counter() - t:.1f}s", flush=True)
    rates: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(a.repeats):
        for name, (g, step) in runs.items():
            if a.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(a.steps):
                step(images[32 * i:32 * (i + 1)], noise[i])
            if a.device == "cuda":
                torch.cuda.synchronize()
            rates[name].append(a.steps / (time.perf_counter() - t))
    ref = statistics.median(rates["fp32"]) if "fp32" in rates else None
    ref_w = torch.cat([p.detach().float().flatten() for p in runs["fp32"][0].parameters()]) if ref else None
    print(f"torch {torch.__version__}, {a.device}, {torch.get_num_threads()} threads, dcgan batch 32, "
          f"{a.steps} steps x {a.repeats} interleaved repeats")
    for name, r in rates.items():
        m = statistics.median(r)
        w = torch.cat([p.detach().float().flatten() for p in runs[name][0].parameters()])
        drift = (w - ref_w).abs().max().item() if ref_w is not None else float("nan")
        print(f"{name:>19}: {m:6.2f} steps/s  x{m / ref:.2f} vs fp32   max |G weight - fp32's| {drift:.2e}")


if __name__ == "__main__":
    main()

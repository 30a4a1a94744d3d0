"""Steps/s of `gantk train` against a bare training loop of the same model, batch, recipe and data.

Interleaved repeats in one run (the machines are shared and noisy); prints a table and the ratio.
gantk's run includes everything it does: data loader, metrics rows, checkpoints, sample grids, plot.

    .venv/bin/python benchmarks/bench_train.py [--data PATH] [--arch dcgan] [--epochs 1] [--repeats 2] [--device cuda] [--amp/--no-amp]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gantk import data, models
from gantk.config import TrainConfig
from gantk.train import default_amp, train

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"


def bare_loop(cfg: TrainConfig, images: torch.Tensor, steps: int) -> float:
    """The recipe with nothing around it, data already on the device: returns seconds for `steps` steps.
    On CUDA with gantk train's cuDNN settings (deterministic, no autotuning); autocast as `cfg.amp` says."""
    torch.manual_seed(cfg.seed)
    dev = images.device
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    g, d = models.build(cfg.arch, spectral_norm=cfg.spectral_norm)
    g, d = g.to(dev), d.to(dev)
    ema = models.ema_copy(g)
    og = torch.optim.Adam(g.parameters(), cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    od = torch.optim.Adam(d.parameters(), cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    b = cfg.batch_size
    real_t = torch.full((b,), cfg.label_smoothing, device=dev)
    fake_t, ones = torch.zeros(b, device=dev), torch.ones(b, device=dev)
    autocast = torch.autocast(dev.type, torch.float16 if dev.type == "cuda" else torch.bfloat16, enabled=cfg.amp)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.amp and dev.type == "cuda")
    start = time.perf_counter()
    perm = torch.randperm(len(images), device=dev)
    for i in range(steps):
        x = images[perm[(i * b) % (len(images) - b):][:b]]
        with autocast:
            fake = g(torch.randn(b, *g.latent_shape, device=dev))
            loss_d = F.binary_cross_entropy_with_logits(d(x).float(), real_t) + \
                F.binary_cross_entropy_with_logits(d(fake.detach()).float(), fake_t)
        od.zero_grad()
        scaler.scale(loss_d).backward()
        scaler.step(od)
        with autocast:
            loss_g = F.binary_cross_entropy_with_logits(d(fake).float(), ones)
        og.zero_grad()
        scaler.scale(loss_g).backward()
        scaler.step(og)
        scaler.update()
        models.ema_update(ema, g, cfg.ema_decay)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def gantk_run(cfg: TrainConfig) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        s = train(cfg, runs_dir=Path(tmp))
        return time.perf_counter() - start, s["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(MNIST) if MNIST.exists() else "synthetic")
    ap.add_argument("--arch", default="dcgan")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                    help="autocast on both sides [default: gantk train's, bf16 where the CPU has it]")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.data == "synthetic":  # drawn once here: the bare loop is handed its digits, so gantk's runs are too
            a.data = str(Path(tmp) / "synthetic.npy")
            np.save(a.data, data.synthetic(10_000).images)
        measure(a)


def measure(a: argparse.Namespace) -> None:
    amp = default_amp(torch.device(a.device)) if a.amp is None else a.amp
    cfg = TrainConfig(data=a.data, arch=a.arch, epochs=a.epochs, data_count=10_000, device=a.device, amp=amp)
    images = data.to_tensor(data.load(a.data, count=10_000).images).to(a.device)
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, arch {a.arch}, batch {cfg.batch_size}, "
          f"data {a.data} ({len(images)} images), {a.epochs} epoch(s) per run, amp {amp}")
    bare_loop(cfg, images, 20)  # warm-up: CUDA's context and cuDNN's start-up, paid once per process
    ours, bare = [], []
    for r in range(a.repeats):
        seconds, steps = gantk_run(cfg)
        ours.append(steps / seconds)
        bare.append(steps / bare_loop(cfg, images, steps))
        print(f"repeat {r + 1}: gantk train {ours[-1]:6.2f} steps/s   bare loop {bare[-1]:6.2f} steps/s")
    o, b = statistics.median(ours), statistics.median(bare)
    print(f"median: gantk {o:.2f} steps/s, bare {b:.2f} steps/s, gantk/bare = {o / b:.3f} "
          f"(bookkeeping costs {100 * (1 - o / b):.1f}%)")


if __name__ == "__main__":
    main()

"""Benchmark `gantk generate`: end-to-end img/s against pure inference img/s per backend, onnxruntime CPU
thread settings, and the seed-style baseline (eager PyTorch, batch 32, one PNG at a time).

    python benchmarks/bench_generate.py [--checkpoint runs/<run>/checkpoints/last.pt] [--count 10000]

Prints figures, asserts nothing: the machines are shared and noisy, so compare ratios from one run.
End to end = noise + inference + PNG encoding + atomic writes + manifest (the timed phase of
`generate`, after the parity check); pure inference = the backend call alone on noise drawn beforehand.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="default: newest run under ./runs, else a 2-step run")
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--backends", default="onnxruntime,torchscript,torch")
    p.add_argument("--provider", default="auto", help="auto|cpu|cuda|tensorrt (onnxruntime)")
    p.add_argument("--threads", default="1,2", help="onnxruntime intra-op threads to compare")
    p.add_argument("--work", type=Path, default=None, help="scratch folder [default: a temp dir]")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="gantk-bench-") as tmp:
        work = a.work or Path(tmp)
        models = _models(a.checkpoint, work)
        _header(a, models)
        _thread_sweep(models["onnxruntime"], a, work)
        print(f"\n## per backend (default settings), --count {a.count}")
        print(f"{'backend':<12} {'provider':<9} {'pure img/s':>11} {'e2e img/s':>10} {'e2e/pure':>8} {'wall s':>7}")
        for name in a.backends.split(","):
            _backend_row(name, models[name], a, work)
        _baseline(models["torch"], a.count, work)


def _models(checkpoint: Path | None, work: Path) -> dict[str, Path]:
    from gantk.checkpoint import newest_checkpoint
    from gantk.exporters import EXPORTERS

    if checkpoint is None:
        try:
            checkpoint = newest_checkpoint("runs")
        except Exception:
            checkpoint = _tiny_run(work)
    onnx, pt = work / "generator.onnx", work / "generator.pt"
    EXPORTERS["onnx"](checkpoint, onnx)
    EXPORTERS["torchscript"](checkpoint, pt)
    return {"onnxruntime": onnx, "torchscript": pt, "torch": checkpoint}


def _tiny_run(work: Path) -> Path:
    from gantk.config import TrainConfig
    from gantk.train import train

    s = train(TrainConfig(data="synthetic", data_count=64, max_steps=2, epochs=1), runs_dir=work / "runs")
    return Path(s["run_dir"]) / "checkpoints" / "last.pt"


def _header(a, models) -> None:
    import onnxruntime
    import torch

    print(f"# bench_generate  {time.strftime('%Y-%m-%d %H:%M')}  count={a.count} batch={a.batch_size}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, cuda {torch.cuda.is_available()}")
    print(f"# checkpoint {models['torch']}")


def pure_inference(backend, count: int, batch_size: int) -> float:
    """img/s of the backend call alone, noise drawn beforehand (one warm-up batch not counted)."""
    from gantk.generate import noise

    z = noise(0, range(count), backend.latent_shape)
    backend(z[:batch_size])
    t0 = time.perf_counter()
    for lo in range(0, count, batch_size):
        backend(z[lo:lo + batch_size])
    return count / (time.perf_counter() - t0)


def end_to_end(model: Path, backend: str, a, out: Path, *, threads: int | None = None,
               provider: str = "auto", writers: int = 2) -> dict:
    from gantk.generate import Request, generate

    req = Request(out=out, count=a.count, batch_size=a.batch_size, writers=writers)
    t0 = time.perf_counter()
    s = generate(req, model=model, backend=backend, provider=provider, threads=threads)
    s["wall_s"] = time.perf_counter() - t0
    return s


def _thread_sweep(model: Path, a, work: Path) -> None:
    """onnxruntime CPU: intra-op threads x writer threads, pure and end to end (spinning is off in gantk)."""
    from gantk.backends import open_backend

    print("\n## onnxruntime CPU thread settings (intra-op threads, PNG writers)")
    print(f"{'threads':>7} {'writers':>7} {'pure img/s':>11} {'e2e img/s':>10} {'e2e/pure':>8}")
    for t in (int(v) for v in a.threads.split(",")):
        pure = pure_inference(open_backend("onnxruntime", model, provider="cpu", threads=t), a.count, a.batch_size)
        for w in (1, 2):
            s = end_to_end(model, "onnxruntime", a, work / f"sweep-{t}-{w}", threads=t, provider="cpu", writers=w)
            print(f"{t:>7} {w:>7} {pure:>11.0f} {s['images_per_s']:>10.0f} {s['images_per_s'] / pure:>8.2f}")


def _backend_row(name: str, model: Path, a, work: Path) -> None:
    from gantk.backends import open_backend

    provider = a.provider if name == "onnxruntime" else "auto"
    be = open_backend(name, model, provider=provider, batch_size=a.batch_size)
    pure = pure_inference(be, a.count, a.batch_size)
    s = end_to_end(model, name, a, work / f"e2e-{name}", provider=provider)
    print(f"{name:<12} {s['provider']:<9} {pure:>11.0f} {s['images_per_s']:>10.0f} "
          f"{s['images_per_s'] / pure:>8.2f} {s['wall_s']:>7.1f}  parity {s['parity']['status']}", flush=True)


def _baseline(checkpoint: Path, count: int, work: Path) -> None:
    """The seed project's way: eager PyTorch, batch 32, torch.randn noise, one PNG saved at a time."""
    import numpy as np
    import torch
    from PIL import Image

    from gantk.checkpoint import generator_from, load

    g, out = generator_from(load(checkpoint)), work / "baseline"
    out.mkdir()
    torch.set_num_threads(os.cpu_count() or 1)  # torch's default; the torch backend above set its own
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, count, 32):
            x = g(torch.randn(min(32, count - lo), *g.latent_shape))
            px = ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            for k, p in enumerate(px):
                Image.fromarray(np.ascontiguousarray(p), "L").save(out / f"{lo + k:06d}.png")
    rate = count / (time.perf_counter() - t0)
    print(f"{'seed-style':<12} {'cpu':<9} {'':>11} {rate:>10.0f} {'':>8} {count / rate:>7.1f}  "
          f"(eager torch, batch 32, one PNG at a time)")


if __name__ == "__main__":
    sys.exit(main())

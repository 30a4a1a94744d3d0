"""The GPU half of `gantk bench`: device-resident inference timed between synchronisations.

Every route gets its noise already on the device and leaves its images there, so a rate is pure
inference: torch eager (TF32 off, as generate's torch backend runs, and TF32 on), torch with BatchNorm
folded and channels_last in fp32, fp16 and bf16, and onnxruntime's CUDA (and TensorRT, where it
starts) provider on the fp32 and fp16 exports through IO binding. One more row times generate's
onnxruntime backend as `generate` calls it: noise from host memory, images back to it.

Each (route, batch) is warmed up and calibrated to at least MIN_SECONDS a measurement, then timed once
per repeat, repeats interleaved; figures are medians. Peaks: the best torch matmul of each dtype
(MATMUL_N^2, TF32 off for fp32) timed in the same loop. Parity: against eager fp32 on the CPU, same
noise. End to end: `generate` on the GPU to PNGs (at several writer counts) and to .npy, with the
summary's breakdown of where the time went.

Runs on any torch device (the tests run it on the CPU, with small sizes); onnxruntime rows need CUDA.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

BATCHES = (256, 4096, 16384)
MIN_SECONDS = 0.2
MATMUL_N = 8192
PEAK_CALLS = 5
E2E_COUNT = 100_000
E2E_BATCHES = (256,)  # generate's default; 4096 was slower at every writer count

Step = Callable[[], None]
Fetch = Callable[[], np.ndarray]


@dataclass
class DeviceRoute:
    """A device path: `build(noise)` puts the noise on the device and returns (step, fetch): step runs one
    batch leaving the images on the device, fetch returns the last images as float32 on the host."""

    name: str
    precision: str
    build: Callable[[np.ndarray], tuple[Step, Fetch]]
    note: str = ""


# ------------------------------------------------------------------------------------------ routes


def _torch_build(module, device: str, *, tf32: bool = False) -> Callable[[np.ndarray], tuple[Step, Fetch]]:
    import torch

    def build(z: np.ndarray) -> tuple[Step, Fetch]:
        zt = torch.from_numpy(z).to(device)
        box: dict[str, Any] = {}

        def step() -> None:
            torch.backends.cudnn.allow_tf32 = tf32
            with torch.inference_mode():
                box["y"] = module(zt)

        return step, lambda: box["y"].float().cpu().numpy()

    return build


def torch_routes(g, device: str) -> list[DeviceRoute]:
    """Eager (the reference layout) and the folded channels_last module in each dtype the device runs."""
    from .exporters.fold import channels_last

    eager = copy.deepcopy(g).to(device).eval()
    cl = lambda dtype: channels_last(g, dtype=dtype).to(device)  # noqa: E731
    routes = [DeviceRoute("torch eager", "fp32", _torch_build(eager, device), "TF32 off: generate's torch backend")]
    if device.startswith("cuda"):
        routes.append(DeviceRoute("torch eager", "tf32", _torch_build(eager, device, tf32=True), "TF32 convolutions"))
    routes.append(DeviceRoute("torch folded+cl", "fp32", _torch_build(cl("fp32"), device), "BN folded, channels_last"))
    for dtype in ("fp16", "bf16") if device.startswith("cuda") else ("bf16",):
        routes.append(DeviceRoute("torch folded+cl", dtype, _torch_build(cl(dtype), device), f"{dtype} weights"))
    return routes


def onnxruntime_routes(files: dict[str, Path]) -> list[DeviceRoute]:
    """onnxruntime CUDA/TensorRT through IO binding (device-resident), and generate's backend with host copies."""
    import onnxruntime as ort

    from .backends import ORT_NAMES

    available = ort.get_available_providers()
    routes = []
    for provider in ("cuda", "tensorrt"):
        if ORT_NAMES[provider] in available:
            routes += [DeviceRoute(f"onnxruntime {provider}", "fp32", _ort_build(files["onnx"], provider), "IO binding"),
                       DeviceRoute(f"onnxruntime {provider}", "fp16", _ort_build(files["onnx-fp16"], provider),
                                   "IO binding, fp16 export")]
    if ORT_NAMES["cuda"] in available:
        routes.append(DeviceRoute("onnxruntime cuda", "fp32", _ort_host_build(files["onnx"]),
                                  "generate's backend: + host copies"))
    return routes


def _ort_build(path: Path, provider: str) -> Callable[[np.ndarray], tuple[Step, Fetch]]:
    from .backends import open_backend

    def build(z: np.ndarray) -> tuple[Step, Fetch]:
        be = open_backend("onnxruntime", path, provider=provider, batch_size=len(z))
        be.bound.z.update_inplace(z)
        return be.bound.run, be.bound.out.numpy

    return build


def _ort_host_build(path: Path) -> Callable[[np.ndarray], tuple[Step, Fetch]]:
    from .backends import open_backend

    def build(z: np.ndarray) -> tuple[Step, Fetch]:
        be = open_backend("onnxruntime", path, provider="cuda", batch_size=len(z))
        box: dict[str, np.ndarray] = {}
        return (lambda: box.__setitem__("y", be(z))), (lambda: box["y"])

    return build


# ------------------------------------------------------------------------------------------ timing


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _timed(step: Step, calls: int, sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    sync()
    return time.perf_counter() - t0


def _calibrate(step: Step, sync: Callable[[], None], min_seconds: float) -> int:
    """Warm up, then the number of calls that takes at least `min_seconds`."""
    step()
    once = _timed(step, 1, sync)
    return max(1, math.ceil(min_seconds / max(once, 1e-6)))


def device_peaks(device: str, *, n: int = MATMUL_N) -> dict[str, Callable[[], float]]:
    """dtype -> a function timing PEAK_CALLS n^2 matmuls (GFLOP/s); fp32 with TF32 off, tf32 with it on."""
    import torch

    a = torch.randn(n, n, device=device)
    sync, flop = _sync(device), 2.0 * n ** 3
    dtypes = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False)}
    if device.startswith("cuda"):
        dtypes.update({"tf32": (torch.float32, True), "fp16": (torch.float16, False)})

    def peak(dtype, tf32: bool) -> Callable[[], float]:
        x = a.to(dtype)

        def step() -> None:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            x @ x

        return lambda: flop * PEAK_CALLS / _timed(step, PEAK_CALLS, sync) / 1e9

    return {name: peak(*spec) for name, spec in dtypes.items()}


def measure(routes: list[DeviceRoute], noise: dict[int, np.ndarray], *, device: str, repeats: int,
            min_seconds: float = MIN_SECONDS, progress: Callable[[str], None] = lambda m: None,
            peak_n: int = MATMUL_N) -> tuple[dict, dict, dict, list[dict]]:
    """(rates img/s, peaks GFLOP/s, outputs at the largest batch, routes that did not start), interleaved."""
    sync = _sync(device)
    steps, calls, outs, failed = {}, {}, {}, []
    big = max(noise)
    for i, r in enumerate(routes):
        try:
            for bs, z in noise.items():
                steps[(i, bs)], fetch = r.build(z)
                calls[(i, bs)] = _calibrate(steps[(i, bs)], sync, min_seconds)
                if bs == big:
                    outs[i] = fetch()
        except Exception as e:  # noqa: BLE001 - TensorRT without its libraries, an engine build, out of memory
            failed.append({"route": r.name, "precision": r.precision,
                           "error": str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__})
            for bs in noise:
                steps.pop((i, bs), None)
    peak_fns = device_peaks(device, n=peak_n)
    for fn in peak_fns.values():
        fn()
    rates: dict = {k: [] for k in steps}
    peaks: dict = {k: [] for k in peak_fns}
    keys = list(steps)
    for rep in range(repeats):
        progress(f"gpu repeat {rep + 1}/{repeats}")
        shift = rep % max(1, len(keys))
        for key in keys[shift:] + keys[:shift]:
            rates[key].append(calls[key] * key[1] / _timed(steps[key], calls[key], sync))
        for name, fn in peak_fns.items():
            peaks[name].append(fn())
    return ({k: statistics.median(v) for k, v in rates.items()}, {k: max(v) for k, v in peaks.items()}, outs, failed)


# ------------------------------------------------------------------------------------------ the section


def reference(g, z: np.ndarray, *, chunk: int = 1024) -> np.ndarray:
    """Eager fp32 on the CPU: the parity reference."""
    import torch

    cpu = copy.deepcopy(g).cpu().eval()
    with torch.inference_mode():
        return np.concatenate([cpu(torch.from_numpy(z[lo:lo + chunk])).numpy() for lo in range(0, len(z), chunk)])


def gpu_section(g, files: dict[str, Path], *, device: str = "cuda", batch_sizes=BATCHES, repeats: int = 5,
                min_seconds: float = MIN_SECONDS, peak_n: int = MATMUL_N,
                progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Rows for every device route at every batch size, with peaks, shares of peak and parity."""
    import torch

    from .bench import parity
    from .exporters.validate import fixed_noise
    from .models import flops_per_image

    routes = torch_routes(g, device) + (onnxruntime_routes(files) if device.startswith("cuda") else [])
    z = fixed_noise(tuple(g.latent_shape), count=max(batch_sizes))
    noise = {bs: np.ascontiguousarray(z[:bs]) for bs in batch_sizes}
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        rates, peaks, outs, failed = measure(routes, noise, device=device, repeats=repeats, min_seconds=min_seconds,
                                             progress=progress, peak_n=peak_n)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    ref = reference(g, noise[max(batch_sizes)])
    useful = flops_per_image(g)["useful"]
    rows = []
    for (i, bs), rate in rates.items():
        r = routes[i]
        top = peaks.get(r.precision)
        gflops = rate * useful / 1e9
        rows.append({"route": r.name, "precision": r.precision, "device": device, "batch": bs,
                     "images_per_s": round(rate, 1), "gflops": round(gflops, 1),
                     "peak_share": round(gflops / top, 4) if top else None, "note": r.note, **parity(outs[i], ref)})
    return {"device": _device_name(device), "batch_sizes": list(batch_sizes), "repeats": repeats,
            "peaks_gflops": {k: float(f"{v:.4g}") for k, v in peaks.items()}, "rows": rows, "not_started": failed}


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def gpu_end_to_end(files: dict[str, Path], checkpoint: Path, work: Path, *, count: int = E2E_COUNT,
                   batch_sizes: tuple[int, ...] = E2E_BATCHES, writers: tuple[int, ...] | None = None) -> list[dict]:
    """`generate --count N` on the GPU to PNGs at each writer count and batch size, and to .npy; with the
    summary's breakdown of where the time went. Each run's folder stays in `work` (the bench's temp
    folder) until the bench ends, as on the CPU: on an H200 host's ext4 without a journal, 15 writers
    made 9,500 PNGs/s right after earlier runs' folders were deleted, 31,700 on tmpfs a minute later."""
    import onnxruntime as ort

    from .generate import Request, generate

    from .backends import cores as usable

    cores = usable()
    writers = writers or tuple(sorted({2, max(2, cores // 2), max(2, cores - 1)}))
    onnx_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    model, backend = (files["onnx"], "onnxruntime") if onnx_cuda else (checkpoint, "torch")
    runs = [("png", w, bs) for bs in batch_sizes for w in writers] + [("npy", max(writers), bs) for bs in batch_sizes]
    rows = []
    for fmt, w, bs in runs:
        out, t0 = work / f"gpu-{fmt}-w{w}-b{bs}", time.perf_counter()
        try:
            s = generate(Request(out=out, count=count, fmt=fmt, batch_size=bs, writers=w),
                         model=model, backend=backend, provider="cuda")
        except Exception as e:  # noqa: BLE001 - one failed run is a row, not the end of the bench
            rows.append({"backend": backend, "format": fmt, "writers": w, "batch_size": bs, "error": str(e)[:300]})
            continue
        rows.append({"backend": backend, "provider": s["provider"], "format": fmt, "writers": w,
                     "count": count, "batch_size": bs, "seconds": s["seconds"],
                     "wall_s": round(time.perf_counter() - t0, 3), "images_per_s": s["images_per_s"],
                     "parity": s["parity"].get("status"), "timing": s["timing"]})
    return rows


# ------------------------------------------------------------------------------------------ the table


def format_gpu(sec: dict[str, Any]) -> list[str]:
    lines = ["", f"# GPU: {sec['device']}; medians of {sec['repeats']} interleaved repeats, device-resident unless noted",
             "# matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in sec["peaks_gflops"].items()),
             f"{'gpu route':<20}{'prec':<6}{'batch':>7}{'img/s':>11}{'GFLOP/s':>10}{'peak':>7}"
             f"{'max|d|':>10}{'px off':>9}{'lvl':>4}  note"]
    for r in sec["rows"]:
        share = f"{r['peak_share']:.0%}" if r["peak_share"] is not None else "-"
        lines.append(f"{r['route']:<20}{r['precision']:<6}{r['batch']:>7}{r['images_per_s']:>11.0f}{r['gflops']:>10.1f}"
                     f"{share:>7}{r['max_abs_diff']:>10.2e}{r['pixels_off']:>9.3%}{r['max_levels_off']:>4}  {r['note']}")
    lines += [f"not started: {f['route']} {f['precision']}: {f['error']}" for f in sec["not_started"]]
    ort = [r for r in sec["rows"] if r["route"] == "onnxruntime cuda" and r["precision"] == "fp32"
           and not r["note"].startswith("generate's")]
    if ort:
        best = max(ort, key=lambda r: r["images_per_s"])
        lines.append(f"target onnxruntime CUDA (IO binding) >= 100,000 img/s pure inference: {best['images_per_s']:.0f} "
                     f"img/s at batch {best['batch']}")
    for e in sec.get("end_to_end", []):
        if "error" in e:
            lines.append(f"gpu end to end: {e['backend']} {e['format']} writers {e['writers']} batch {e['batch_size']}: "
                         f"failed: {e['error']}")
            continue
        t = ", ".join(f"{k} {v:.2f}s" for k, v in e["timing"].items())
        w = f" writers {e['writers']}"
        lines.append(f"gpu end to end: {e['backend']} on {e['provider']} {e['format']}{w} batch {e['batch_size']} "
                     f"count {e['count']}: {e['images_per_s']:.0f} img/s ({e['seconds']:.2f}s; {t})")
    return lines

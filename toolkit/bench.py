"""`gantk bench`: every inference path gantk offers, measured side by side in one interleaved run.

What runs. For a checkpoint (and its ONNX export): eager torch fp32 (the reference), torch fp32 and (on
CPUs with bf16 instructions) bf16 with BatchNorm folded and channels_last, TorchScript, onnxruntime CPU
fp32 at each thread count asked for and in generate's default streams (`backends.cpu_plan`), and fp16.
Each path at each batch size is warmed up, then timed once per repeat, the repeats interleaved (repeat
r runs every path before r + 1 starts, the order rotated), so a neighbour's load on this shared machine
hits all paths alike; figures are medians. Compare ratios within one run, never figures across runs. With CUDA present, bench_gpu adds
a GPU section (device-resident routes, the GPU's own matmul peaks, generate end to end on the GPU).

Figures. images/s; useful GFLOP/s (models.flops_per_image, zero padding of transposed convs not
counted); the share of the machine's peak: the best rate of torch or onnxruntime on a 1024^2 matmul of
the same dtype at the same thread count or fewer, timed in the same interleaved loop (fp16 rows, which
this CPU runs through fp32 arithmetic, are set against the fp32 peak); parity against eager fp32 on the same
noise (max abs diff, share of uint8 pixels off, most levels a pixel moved); and end to end, the median
of up to 3 interleaved runs each: `generate --count N` for the default path (onnxruntime, fp32, default
batch, threads and streams), one onnxruntime stream at each other thread count, the default's npy
variant, the TorchScript backend, the bf16 TorchScript export to PNGs and npy, and the seed-style
baseline (eager fp32, batch 32, one PNG saved at a time), each with where its time went (generate's
`timing`: inference, and the inference thread's waits for noise and PNG workers) and its CPU per image
and share of the cores kept busy: a run near 100% busy is limited by its work per image, not by waits.

The library returns one dict (the `--json` document); `format_table` renders it for people.
"""
from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import Interrupted, UsageError

log = logging.getLogger("gantk")


Runner = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[str], None]
MIN_IMAGES = 256        # images per timed measurement (batch 1 runs 256 calls)
MATMUL_N = 1024
PEAK_CALLS = 3       # a matmul peak is the best of this many calls
BASELINE_BATCH = 32
E2E_REPEATS = 3      # end-to-end runs per row (at most --repeats)


@dataclass
class Route:
    """One inference path: a name people read, its precision and threads, and how to build its runner."""

    name: str
    precision: str
    threads: int
    device: str
    build: Callable[[int], Runner]    # batch size -> runner (CUDA paths bind one fixed shape per size)
    note: str = ""
    streams: int = 1                  # concurrent runs of `threads` threads each (onnxruntime on the CPU)


# ------------------------------------------------------------------------------------------ inputs


def resolve_inputs(*, model: Path | None, checkpoint: Path | None, runs_dir: Path) -> tuple[Path, Path | None]:
    """(checkpoint, onnx export or None). Defaults: the model's source checkpoint, the newest run's files."""
    from .checkpoint import newest_run, resolve
    from .exporters import export_kind, read_metadata

    if model is not None:
        meta = read_metadata(model)
        if export_kind(model) != "onnx":
            raise UsageError(f"--model {model}: bench takes an ONNX export (the TorchScript routes are exported "
                             "from the checkpoint)")
        if checkpoint is None:
            src = meta.get("source_checkpoint") or ""
            if not src or not Path(src).is_file():
                raise UsageError(f"{model}: its source checkpoint {src or '(none recorded)'} is not there; "
                                 "pass --checkpoint")
            checkpoint = Path(src)
            if not _exported_from(meta, checkpoint):  # trained on since: its numbered copy, as generate finds it
                from .generate import _same_checkpoint

                checkpoint = _same_checkpoint(checkpoint, str(meta.get("step", "")), meta["source_sha256"]) \
                    or checkpoint
        checkpoint = resolve(checkpoint)
        if not _exported_from(meta, checkpoint):
            raise UsageError(f"--model {model} was exported from a checkpoint of sha256 "
                             f"{meta['source_sha256'][:12]}..., which {checkpoint} no longer is (another checkpoint, "
                             "or one trained further since); pass the checkpoint it came from, or export again")
        return checkpoint, Path(model)
    if checkpoint is not None:
        return resolve(checkpoint), None
    run = newest_run(runs_dir)
    checkpoint, onnx = resolve(run / "checkpoints" / "last.pt"), run / "export" / "generator.onnx"
    if onnx.is_file() and not _exported_from(read_metadata(onnx), checkpoint):
        log.warning("%s was exported before %s was trained further; bench exports it afresh", onnx, checkpoint)
        return checkpoint, None
    return checkpoint, onnx if onnx.is_file() else None


def _exported_from(meta: dict[str, str], checkpoint: Path) -> bool:
    from .checkpoint import sha256

    return not meta.get("source_sha256") or meta["source_sha256"] == sha256(checkpoint)


def _exports(checkpoint: Path, onnx: Path | None, work: Path) -> dict[str, Path]:
    """The files the paths need; missing ones are exported (and validated) into `work`."""
    from .backends import native_bf16
    from .exporters import EXPORTERS

    files = {"onnx": onnx or work / "generator.onnx", "torchscript": work / "generator.pt",
             "onnx-fp16": work / "generator-fp16.onnx", "torchscript-bf16": work / "generator-bf16.pt"}
    if onnx is None:
        EXPORTERS["onnx"](checkpoint, files["onnx"])
    EXPORTERS["torchscript"](checkpoint, files["torchscript"])
    EXPORTERS["onnx"](checkpoint, files["onnx-fp16"], dtype="fp16")
    if native_bf16():  # emulated bf16 runs 3-80x slower than fp32: no rows, or the bench takes an hour
        EXPORTERS["torchscript"](checkpoint, files["torchscript-bf16"], dtype="bf16")
    else:
        del files["torchscript-bf16"]
    return files


# ------------------------------------------------------------------------------------------ paths


def _torch_runner(module, threads: int) -> Runner:
    import torch

    def run(z: np.ndarray) -> np.ndarray:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return module(torch.from_numpy(z)).float().numpy()

    return run


def cpu_paths(g, files: dict[str, Path], *, threads: list[int]) -> list[Route]:
    """The CPU paths: eager first (it is the parity reference), the default onnxruntime one after."""
    from .backends import cpu_plan, open_backend
    from .exporters.fold import channels_last

    t0 = threads[0]
    ort = lambda f, t, s=1: (lambda bs: open_backend("onnxruntime", f, provider="cpu", threads=t,  # noqa: E731
                                                     streams=s).run)
    bf16 = lambda bs: _torch_runner(channels_last(g, dtype="bf16"), t0)  # noqa: E731
    paths = [Route("torch eager", "fp32", t0, "cpu", lambda bs: _torch_runner(g, t0), "seed-style reference"),
             Route("torch folded+cl", "fp32", t0, "cpu",
                   lambda bs: _torch_runner(channels_last(g, dtype="fp32"), t0), "BN folded, channels_last")]
    if "torchscript-bf16" in files:  # only where the CPU has bf16 instructions (see _exports)
        paths.append(Route("torch-bf16", "bf16", t0, "cpu", bf16, "= export --dtype bf16 (TorchScript)"))
    paths.append(Route("torchscript", "fp32", t0, "cpu", lambda bs: _torchscript(files["torchscript"], t0)))
    defaults = {"generate default": cpu_plan("onnxruntime", None, None, fmt="png"),
                "generate default for npy": cpu_plan("onnxruntime", None, None, fmt="npy")}
    plans = [(t, 1) for t in threads] + list(defaults.values())
    for t, n in dict.fromkeys(plans):
        note = ", ".join(k for k, p in defaults.items() if p == (t, n))
        paths.append(Route("onnxruntime", "fp32", t, "cpu", ort(files["onnx"], t, n),
                           f"{n} streams of {t} thread{'s' if t > 1 else ''}" + (f"; {note}" if note else "")
                           if n > 1 else note, streams=n))
    paths.append(Route("onnxruntime", "fp16", t0, "cpu", ort(files["onnx-fp16"], t0), "fp16 export"))
    return paths


def _torchscript(path: Path, threads: int) -> Runner:
    from .exporters.torchscript import _quiet_jit

    import torch

    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu")
    return _torch_runner(module, threads)


# ------------------------------------------------------------------------------------------ timing


def _rate(run: Runner, z: np.ndarray) -> tuple[float, float]:
    """images/s of `run` on batch `z`, over at least MIN_IMAGES images, and the CPU it took (this process's
    threads), in core-us per image."""
    calls = max(1, -(-MIN_IMAGES // len(z)))
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        run(z)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return calls * len(z) / wall, cpu / (calls * len(z)) * 1e6


def matmul_peaks(threads: int) -> dict[str, Callable[[], float]]:
    """dtype -> a function timing a MATMUL_N^2 matmul at `threads` threads (GFLOP/s, best of PEAK_CALLS calls).

    fp32 takes the better of torch (MKL, which runs its AVX2 code on AMD CPUs) and onnxruntime's MLAS
    MatMul; bf16 is torch's oneDNN. numpy is left out: its BLAS threads are not ours to set.
    """
    import torch

    a = np.random.default_rng(0).standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(a).bfloat16()
    ort_mm = _ort_matmul(threads)
    flop = 2.0 * MATMUL_N ** 3

    def timed(fn) -> float:  # a peak: the best of PEAK_CALLS calls
        best = float("inf")
        for _ in range(PEAK_CALLS):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return flop / best / 1e9

    def torch_mm(x):
        torch.set_num_threads(threads)
        return x @ x

    return {"fp32": lambda: max(timed(lambda: torch_mm(ta)), timed(lambda: ort_mm(a))),
            "bf16": lambda: timed(lambda: torch_mm(tb))}


def peak_envelope(peak: dict[tuple[str, int], float]) -> dict[tuple[str, int], float]:
    """The peak at n threads is the best measured with n or fewer: n threads can leave some idle. (On a
    loaded 16-core host a 16-thread bf16 matmul once ran at 370 GFLOP/s against 2,699 with 8 threads.)"""
    return {(dt, t): max(v for (d, u), v in peak.items() if d == dt and u <= t) for dt, t in peak}


def _peak(key: str, value: float, doc: dict[str, Any]) -> str:
    measured = doc.get("peaks_measured_gflops", {}).get(key, value)
    return f"{key} {value:.0f}" + (f" (measured {measured:.0f})" if measured < value else "")


def _ort_matmul(threads: int) -> Runner:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [MATMUL_N, MATMUL_N]) for n in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm", io[:2], io[2:])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"a": x, "b": x})[0]


def interleaved(runners: dict[tuple[int, int], Runner], noise: dict[int, np.ndarray],
                peaks: dict[tuple[str, int], Callable[[], float]], *, repeats: int,
                progress: Progress) -> tuple[dict, dict]:
    """Warm up everything, then `repeats` rounds each timing every (route, batch) and every peak once.

    Routes: the median over repeats (rate, and CPU per image). Peaks: the best over repeats, so a
    neighbour's burst during one matmul cannot lower the bar (a share of peak is then, if anything,
    understated)."""
    keys = list(runners)
    for (p, bs), run in runners.items():
        run(noise[bs])
        run(noise[bs])
    for fn in peaks.values():
        fn()
    rates: dict = {k: [] for k in keys}
    peak: dict = {k: [] for k in peaks}
    for r in range(repeats):
        progress(f"repeat {r + 1}/{repeats}")
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            rates[key].append(_rate(runners[key], noise[key[1]]))
        for key, fn in peaks.items():
            peak[key].append(fn())
    return ({k: float(np.median([rate for rate, _ in v])) for k, v in rates.items()},
            {k: float(np.median([cpu for _, cpu in v])) for k, v in rates.items()},
            {k: float(max(v)) for k, v in peak.items()})


# ------------------------------------------------------------------------------------------ parity


def parity(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Against eager fp32 on the same noise: max abs diff, share of uint8 pixels off, most levels moved."""
    from .exporters.validate import figures
    from .generate import to_pixels

    levels = np.abs(to_pixels(out).astype(np.int16) - to_pixels(ref).astype(np.int16))
    return {"max_abs_diff": figures(out, ref)["max_abs_diff"],  # non-finite: inf
            "pixels_off": float((levels > 0).mean()), "max_levels_off": int(levels.max())}


# ------------------------------------------------------------------------------------------ end to end


def end_to_end(model: Path, backend: str, *, out: Path, count: int, fmt: str = "png",
               threads: int | None = None, label: str | None = None) -> dict[str, Any]:
    """`generate` as the command runs it, defaults unless `threads`; the timed phase, its CPU seconds (this
    process and the workers) and the wall time."""
    from .backends import cores, cpu_settings
    from .generate import Request, generate

    t0 = time.perf_counter()
    s = generate(Request(out=out, count=count, fmt=fmt), model=model, backend=backend, provider="cpu",
                 threads=threads)
    plan = cpu_settings(s["settings"])
    return {"backend": label or backend, "format": fmt, "count": count, "threads": plan[0], "streams": plan[1],
            "batch_size": s["batch_size"],
            "seconds": s["seconds"], "wall_s": round(time.perf_counter() - t0, 3), "cpu_s": s["timing"]["cpu"],
            "cores": cores(), "images_per_s": s["images_per_s"], "parity": s["parity"].get("status"),
            "timing": s["timing"]}


def seed_style_baseline(g, *, out: Path, count: int) -> dict[str, Any]:
    """The seed project's way: eager fp32, batch 32, torch.randn noise, one PNG saved at a time."""
    import torch
    from PIL import Image

    from .backends import cores

    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cores())  # torch's own default (the cores this process may use), as the seed ran
    torch.manual_seed(0)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for lo in range(0, count, BASELINE_BATCH):
            x = g(torch.randn(min(BASELINE_BATCH, count - lo), *g.latent_shape))
            px = ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            for k, p in enumerate(px):
                Image.fromarray(np.ascontiguousarray(p), "L").save(out / f"{lo + k:06d}.png")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"backend": "seed-style baseline", "format": "png", "count": count, "threads": cores(),
            "batch_size": BASELINE_BATCH, "seconds": round(seconds, 3), "wall_s": round(seconds, 3),
            "cpu_s": round(cpu, 3), "cores": cores(), "images_per_s": round(count / seconds, 1), "parity": "n/a"}


# ------------------------------------------------------------------------------------------ the command


def bench(*, model: Path | None = None, checkpoint: Path | None = None, runs_dir: Path = Path("runs"),
          batch_sizes: tuple[int, ...] = (1, 64, 256), repeats: int = 5, count: int = 10000,
          threads: tuple[int, ...] | None = None, e2e: bool = True, gpu_batch_sizes: tuple[int, ...] | None = None,
          gpu_count: int | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every route at every batch size in one interleaved run; the --json document.

    With CUDA present the document also has a `gpu` section (bench_gpu): device-resident routes at
    `gpu_batch_sizes` and, with `e2e`, generate on the GPU with `gpu_count` images."""
    import torch

    from .backends import default_threads
    from .bench_gpu import BATCHES, E2E_COUNT

    progress = progress or (lambda msg: None)
    _check(batch_sizes=batch_sizes, repeats=repeats, count=count, threads=threads)
    if gpu_batch_sizes is not None and (not gpu_batch_sizes or min(gpu_batch_sizes) < 1):
        raise UsageError(f"--gpu-batch-sizes must be positive, got {_listed(gpu_batch_sizes)}")
    if gpu_count is not None and gpu_count < 1:
        raise UsageError(f"--gpu-count must be at least 1, got {gpu_count}")
    gpu = {"batch_sizes": tuple(gpu_batch_sizes or BATCHES), "count": gpu_count or E2E_COUNT} \
        if torch.cuda.is_available() else None
    threads = tuple(threads or _thread_counts(default_threads()))
    ckpt, onnx = resolve_inputs(model=model, checkpoint=checkpoint, runs_dir=runs_dir)
    with tempfile.TemporaryDirectory(prefix="gantk-bench-") as tmp:
        try:
            return _measure(ckpt, onnx, Path(tmp), batch_sizes=batch_sizes, repeats=repeats, count=count,
                            threads=list(threads), e2e=e2e, gpu=gpu, progress=progress)
        except Interrupted as e:  # generate's own report names a folder of the bench's, about to go
            raise Interrupted("interrupted: the bench keeps nothing (its exports and images were temporary)",
                              e.exit_code - 128) from None


def _thread_counts(default: int) -> tuple[int, ...]:
    """generate's default first (the torch routes and the default row run at it), then 1 and all cores."""
    from .backends import cores

    return (default, *sorted({1, cores()} - {default}))


def _listed(values) -> str:
    return ",".join(map(str, values or ())) or "nothing"


def _check(*, batch_sizes, repeats, count, threads) -> None:
    checks = [(batch_sizes and min(batch_sizes) >= 1, f"--batch-sizes must be positive, got {_listed(batch_sizes)}"),
              (repeats >= 1, f"--repeats must be at least 1, got {repeats}"),
              (count >= 1, f"--count must be at least 1, got {count}"),
              (not threads or min(threads) >= 1, f"--threads must be positive, got {_listed(threads)}")]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)


def _measure(ckpt: Path, onnx: Path | None, work: Path, *, batch_sizes, repeats, count, threads, e2e, gpu,
             progress) -> dict[str, Any]:
    from .checkpoint import generator_from, load
    from .exporters.validate import fixed_noise
    from .models import flops_per_image

    g = generator_from(load(ckpt)).eval()
    flops = flops_per_image(g)
    progress("exporting the files the routes need")
    files = _exports(ckpt, onnx, work)
    routes = cpu_paths(g, files, threads=threads)
    z = fixed_noise(tuple(g.latent_shape), count=max(batch_sizes))
    noise = {bs: np.ascontiguousarray(z[:bs]) for bs in batch_sizes}
    runners = {(i, bs): r.build(bs) for i, r in enumerate(routes) for bs in batch_sizes}
    cores = sorted(set(threads) | {r.threads * r.streams for r in routes})
    peaks = {(dt, t): fn for t in cores for dt, fn in matmul_peaks(t).items()}
    rates, cpu, peak = interleaved(runners, noise, peaks, repeats=repeats, progress=progress)
    measured, peak = peak, peak_envelope(peak)
    rows = _rows(routes, runners, rates, cpu, peak, noise, flops["useful"], batch_sizes)
    _warn_off_parity(rows)
    doc = {"machine": machine(), "checkpoint": str(ckpt), "onnx": str(files["onnx"]), "arch": _arch(ckpt),
           "flops_per_image": flops, "batch_sizes": list(batch_sizes), "repeats": repeats, "threads": threads,
           "peaks_gflops": {f"{dt}@{t}": round(v, 1) for (dt, t), v in peak.items()},
           "peaks_measured_gflops": {f"{dt}@{t}": round(v, 1) for (dt, t), v in measured.items()}, "rows": rows}
    if e2e:
        progress(f"end to end, --count {count}, {min(repeats, E2E_REPEATS)} interleaved rounds")
        doc["end_to_end"] = _end_to_end_rows(g, files, work, count=count, threads=threads,
                                             repeats=min(repeats, E2E_REPEATS))
        doc["targets"] = targets(doc)
    if gpu is not None:
        from .bench_gpu import gpu_end_to_end, gpu_section

        progress("GPU routes")
        doc["gpu"] = gpu_section(g, files, batch_sizes=gpu["batch_sizes"], repeats=repeats, progress=progress)
        if e2e:
            progress(f"GPU end to end, --gpu-count {gpu['count']}")
            doc["gpu"]["end_to_end"] = gpu_end_to_end(files, ckpt, work, count=gpu["count"])
    return doc


def _arch(ckpt: Path) -> str:
    from .checkpoint import load

    return load(ckpt)["config"]["arch"]


def _rows(routes, runners, rates, cpu, peak, noise, useful, batch_sizes) -> list[dict[str, Any]]:
    big = max(batch_sizes)
    ref = runners[(0, big)](noise[big])
    rows = []
    for i, r in enumerate(routes):
        figures = parity(runners[(i, big)](noise[big]), ref)
        for bs in batch_sizes:
            rate, dtype = rates[(i, bs)], "bf16" if r.precision == "bf16" else "fp32"
            streams = min(r.streams, bs)  # a batch smaller than the streams runs in fewer (backends.in_streams)
            # n streams of t threads against the better of one n*t-thread matmul and n times a t-thread one
            top = max(peak.get((dtype, r.threads * streams), 0.0), streams * peak.get((dtype, r.threads), 0.0)) or None
            rows.append({"route": r.name, "precision": r.precision, "device": r.device, "threads": r.threads,
                         "streams": streams,
                         "batch": bs, "images_per_s": round(rate, 1), "gflops": round(rate * useful / 1e9, 2),
                         "core_us_per_image": round(cpu[(i, bs)], 1),
                         "peak_share": round(rate * useful / 1e9 / top, 4) if top else None,
                         "peak_dtype": ("bf16" if r.precision == "bf16" else "fp32") if top else None,
                         "note": r.note, **figures})
    return rows


def _warn_off_parity(rows: list[dict[str, Any]]) -> None:
    """A route beyond the tolerance an export of its precision is held to computes another model: its rate
    says nothing of this one (a --model edited after export, a wrong rewrite)."""
    from .exporters.validate import TOLERANCE

    seen = set()
    for r in rows:  # a route's parity is measured once, at the largest batch: one line per route
        key = (r["route"], r["precision"])
        if key not in seen and not r["max_abs_diff"] <= TOLERANCE[r["precision"]]:
            log.warning("%s %s: max abs diff %.3g against eager fp32, beyond the %s tolerance %.3g (%.1f%% of "
                        "pixels off): its figures are not this checkpoint's", r["route"], r["precision"],
                        r["max_abs_diff"], r["precision"], TOLERANCE[r["precision"]], 100 * r["pixels_off"])
            seen.add(key)


def _end_to_end_rows(g, files: dict[str, Path], work: Path, *, count: int, threads: list[int],
                     repeats: int) -> list[dict]:
    """Each end-to-end run `repeats` times, interleaved like the routes (the order rotated each round), each
    into a folder of its own that stays until the bench ends: on ext4 without a journal, every file
    created within a minute of a deletion first scans past the freed inodes (`recently_deleted`): 230-790
    us a file after a deleted run against 20-60 us here. A row is its median run (of an even count, the
    slower middle one), with every run's rate in `runs`."""
    from .backends import cpu_plan

    onnx, default = files["onnx"], cpu_plan("onnxruntime", None, None, fmt="png")
    runs: list[tuple[str, Callable[[Path], dict]]] = [
        ("baseline", lambda out: seed_style_baseline(g, out=out, count=count)),
        ("default", lambda out: end_to_end(onnx, "onnxruntime", out=out, count=count)),
        *[(f"t{t}", lambda out, t=t: end_to_end(onnx, "onnxruntime", out=out, count=count, threads=t))
          for t in dict.fromkeys(threads) if (t, 1) != default],
        ("npy", lambda out: end_to_end(onnx, "onnxruntime", out=out, count=count, fmt="npy")),
        ("torchscript", lambda out: end_to_end(files["torchscript"], "torchscript", out=out, count=count)),
        *[(f"bf16-{fmt}", lambda out, fmt=fmt: end_to_end(files["torchscript-bf16"], "torchscript", out=out,
                                                          count=count, fmt=fmt, label="torchscript bf16"))
          for fmt in ("png", "npy") if "torchscript-bf16" in files]]
    done: dict[str, list[dict]] = {key: [] for key, _ in runs}
    for r in range(repeats):
        shift = r % len(runs)
        for key, run in runs[shift:] + runs[:shift]:
            done[key].append(run(work / f"e2e-{key}-{r}"))
    rows = []
    for key, _ in runs:
        ranked = sorted(done[key], key=lambda row: row["images_per_s"])
        rows.append({**ranked[(len(ranked) - 1) // 2], "runs": [row["images_per_s"] for row in done[key]]})
    return rows


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": _cpu_name(), "cores": os.cpu_count(),
            "load_1min": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "ort_providers": onnxruntime.get_available_providers()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------ targets


def targets(doc: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets as ratios within this run."""
    base = doc["end_to_end"][0]["images_per_s"]
    default = doc["end_to_end"][1]
    pure = _row(doc, "onnxruntime", "fp32", default["threads"], default["streams"], default["batch_size"])
    fp32 = [r for r in doc["rows"] if r["precision"] == "fp32" and r["device"] == "cpu" and r["peak_share"]]
    best = max(fp32, key=lambda r: r["images_per_s"])
    low = [r for r in doc["rows"] if r["precision"] != "fp32" and r["device"] == "cpu"]
    best_low = max(low, key=lambda r: r["images_per_s"])
    return {"default_e2e_vs_baseline": _ratio(default["images_per_s"], base),
            "default_e2e_vs_own_pure": _ratio(default["images_per_s"], pure and pure["images_per_s"]),
            "default_cpu": _cpu_budget(default, pure),
            "other_png_plans": [_versus(doc, e, base) for e in doc["end_to_end"][2:]
                                if (e["backend"], e["format"]) == ("onnxruntime", "png")],
            "fastest_fp32": {k: best[k] for k in ("route", "threads", "streams", "batch", "images_per_s",
                                                   "peak_share")},
            "fastest_reduced_precision": {**{k: best_low[k] for k in ("route", "precision", "threads", "batch",
                                                                       "max_levels_off", "pixels_off")},
                                          "pure_vs_baseline_e2e": _ratio(best_low["images_per_s"], base),
                                          "vs_fastest_fp32": _ratio(best_low["images_per_s"], best["images_per_s"]),
                                          **{f"bf16_{fmt}_e2e_vs_baseline": _ratio(e["images_per_s"], base)
                                             for e in doc["end_to_end"] for fmt in ("png", "npy")
                                             if (e["backend"], e["format"]) == ("torchscript bf16", fmt)}}}


def _cpu_budget(e: dict, pure: dict | None) -> dict[str, Any] | None:
    """Where an end-to-end run's CPU went, in core-us per image, against the 90% target: with every core
    busy, 90% of the pure rate leaves (cores / 0.9 / pure rate) less what inference alone takes (the CPU
    its pure row measured) for everything else: noise, PNGs, the pipeline."""
    if not (pure and e.get("cpu_s") and e.get("seconds")):
        return None
    per_image, busy = _cpu_figures(e)
    inference = pure.get("core_us_per_image") or e["threads"] * e["streams"] / pure["images_per_s"] * 1e6
    return {"core_us_per_image": round(per_image, 1),
            "workers_core_us_per_image": round(e["timing"]["workers_cpu"] / e["count"] * 1e6, 1),
            "busy": round(busy, 3), "cores": e["cores"],
            "pure_inference_core_us_per_image": round(inference, 1),
            "left_at_90pct_core_us_per_image": round(e["cores"] / (0.9 * pure["images_per_s"]) * 1e6 - inference, 1)}


def _versus(doc, e: dict, base: float) -> dict[str, Any]:
    """An onnxruntime PNG run other than the default: the two end-to-end ratios, which pull apart on few
    cores (inference in fewer streams leaves the writers a core and keeps up with itself, but ends later)."""
    pure = _row(doc, "onnxruntime", "fp32", e["threads"], e["streams"], e["batch_size"])
    return {"threads": e["threads"], "streams": e["streams"], "vs_baseline": _ratio(e["images_per_s"], base),
            "vs_own_pure": _ratio(e["images_per_s"], pure and pure["images_per_s"])}


def _row(doc, route: str, precision: str, threads: int, streams: int, batch: int) -> dict | None:
    return next((r for r in doc["rows"] if (r["route"], r["precision"], r["threads"], r["streams"], r["batch"],
                                            r["device"]) == (route, precision, threads, streams, batch, "cpu")), None)


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


# ------------------------------------------------------------------------------------------ the table


def format_table(doc: dict[str, Any]) -> str:
    """The human rendering of `bench`'s document."""
    m = doc["machine"]
    lines = [f"# gantk bench {m['date']}: {m['cpu']}, {m['cores']} cores, load {m['load_1min']}; torch "
             f"{m['torch']}, onnxruntime {m['onnxruntime']}; CUDA: {m['cuda'] or 'none (no CUDA/TensorRT rows)'}",
             f"# {doc['arch']} {doc['checkpoint']}; useful {doc['flops_per_image']['useful'] / 1e6:.1f} MFLOP/image "
             f"(padded {doc['flops_per_image']['padded'] / 1e6:.1f}); medians of {doc['repeats']} interleaved repeats",
             "# matmul peak GFLOP/s: " + ", ".join(_peak(k, v, doc) for k, v in doc["peaks_gflops"].items()), "",
             f"{'route':<18}{'prec':<6}{'dev':<5}{'thr':>5}{'batch':>6}{'img/s':>9}{'GFLOP/s':>9}{'peak':>7}"
             f"{'max|d|':>10}{'px off':>9}{'lvl':>4}  note"]
    for r in doc["rows"]:
        share = f"{r['peak_share']:.0%}" if r["peak_share"] is not None else "-"
        lines.append(f"{r['route']:<18}{r['precision']:<6}{r['device']:<5}{_threads(r):>5}{r['batch']:>6}"
                     f"{r['images_per_s']:>9.0f}{r['gflops']:>9.1f}{share:>7}{r['max_abs_diff']:>10.2e}"
                     f"{r['pixels_off']:>9.3%}{r['max_levels_off']:>4}  {r['note']}")
    if "end_to_end" in doc:
        lines += ["", _e2e_header()] + [_e2e_line(r) for r in doc["end_to_end"]] + ["", _targets_text(doc["targets"])]
    if "gpu" in doc:
        from .bench_gpu import format_gpu

        lines += format_gpu(doc["gpu"])
    return "\n".join(lines)


def _threads(r: dict[str, Any]) -> str:
    """Intra-op threads, as streams x threads where runs go concurrently."""
    streams = r.get("streams") or 1
    return f"{streams}x{r['threads']}" if streams > 1 else str(r["threads"])


def _e2e_header() -> str:
    return (f"{'end to end':<22}{'fmt':<5}{'thr':>5}{'batch':>6}{'count':>7}{'img/s':>9}{'timed s':>9}{'wall s':>8}"
            f"{'infer s':>9}{'wait s':>8}{'core-us':>9}{'busy':>6}  {'parity':<8}"
            "img/s of each run (the median's figures to the left)")


def _e2e_line(r: dict[str, Any]) -> str:
    return (f"{r['backend']:<22}{r['format']:<5}{_threads(r):>5}{r['batch_size']:>6}{r['count']:>7}"
            f"{r['images_per_s']:>9.0f}{r['seconds']:>9.2f}{r['wall_s']:>8.2f}{_seconds(r, 'inference'):>9}"
            f"{_seconds(r, 'png_wait', 'noise_wait'):>8}{_cpu(r)}  {r['parity']:<8}"
            + " ".join(f"{v:.0f}" for v in r.get("runs", [])))


def _cpu_figures(r: dict[str, Any]) -> tuple[float, float]:
    """An end-to-end run's CPU per image (core-us, this process and its workers) and the share of the
    cores it kept busy."""
    return r["cpu_s"] / r["count"] * 1e6, r["cpu_s"] / (r["seconds"] * r["cores"])


def _cpu(r: dict[str, Any]) -> str:
    if not r.get("cpu_s"):
        return f"{'-':>9}{'-':>6}"
    per_image, busy = _cpu_figures(r)
    return f"{per_image:>9.0f}{busy:>6.0%}"


def _seconds(r: dict[str, Any], *keys: str) -> str:
    """Seconds of generate's timing stages (`summary.json`'s `timing`); '-' for the baseline, which has none."""
    timing = r.get("timing")
    return f"{sum(timing.get(k, 0.0) for k in keys):.2f}" if timing else "-"


def _budget_text(b: dict[str, Any] | None) -> list[str]:
    if not b:
        return []
    return [f"  its CPU: {b['core_us_per_image']:.0f} core-us per image ({b['workers_core_us_per_image']:.0f} in the "
            f"workers), {b['busy']:.0%} of {b['cores']} cores busy",
            f"  pure inference alone takes {b['pure_inference_core_us_per_image']:.0f} core-us per image: 90% of its "
            f"rate leaves {b['left_at_90pct_core_us_per_image']:.0f} for noise, PNGs and the rest"]


def _targets_text(t: dict[str, Any]) -> str:
    f, lo = t["fastest_fp32"], t["fastest_reduced_precision"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    return "\n".join([
        f"target default e2e >= 1.5x seed-style baseline: {fmt(t['default_e2e_vs_baseline'])}",
        f"target default e2e >= 90% of its pure inference: {fmt(t['default_e2e_vs_own_pure'])}",
        *_budget_text(t.get("default_cpu")),
        *[f"  other onnxruntime PNG plan {_threads(o)}: {fmt(o['vs_baseline'])} the baseline, "
          f"{fmt(o['vs_own_pure'])} its pure inference" for o in t.get("other_png_plans", [])],
        f"target fastest fp32 >= 80% of fp32 matmul peak: {f['route']} t{_threads(f)} batch {f['batch']} "
        f"{f['images_per_s']:.0f} img/s = {f['peak_share']:.0%}",
        f"target reduced precision >= 5x baseline (10x to npy), every pixel within one level: generate with the "
        f"bf16 TorchScript export {fmt(lo.get('bf16_png_e2e_vs_baseline'))} to PNGs, "
        f"{fmt(lo.get('bf16_npy_e2e_vs_baseline'))} to npy; {lo['route']} {lo['precision']} pure inference "
        f"{fmt(lo['pure_vs_baseline_e2e'])} the baseline's end to end ({fmt(lo['vs_fastest_fp32'])} the fastest "
        f"fp32), up to {lo['max_levels_off']} levels off, {lo['pixels_off']:.1%} of pixels moved"])

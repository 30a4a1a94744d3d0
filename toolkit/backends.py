"""Inference backends behind one call: `backend(z: np.ndarray) -> np.ndarray`.

- `onnxruntime` (an ONNX export): CPU, CUDA (IO binding, device-resident output, one fixed batch shape
  with the last batch padded) or TensorRT, chosen with `provider`;
- `torchscript` (a TorchScript export) and `torch` (a checkpoint, eager): CPU or CUDA.

Every backend takes float32 noise `(N, *latent_shape)` and returns float32 images `(N, 1, 32, 32)`.
Backends that are not batch-size invariant on their own (torch, CUDA) run one fixed compute shape and
pad, so that image i never depends on which batch it was in. After an onnxruntime session is made,
`get_providers()` says what really runs: an explicitly requested provider that is not active is a
UsageError naming the cause; `auto` falls back to the CPU, with a warning where an NVIDIA GPU is there
but unusable (quietly on a machine without one).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import CheckpointError, UsageError

log = logging.getLogger("gantk")

BACKENDS = ("onnxruntime", "torchscript", "torch")
PROVIDERS = ("auto", "cuda", "tensorrt", "cpu")
IMAGE_SHAPE = (1, 32, 32)
MAX_STREAMS = 8   # default onnxruntime CPU streams for npy, at most (more is unmeasured)
FIXED_BATCH = 64  # compute shape of the torch backends on CPU (position in a fixed-shape batch is invariant)
# generate's compute shape on a GPU, whatever --batch-size: cuDNN picks kernels by shape, so another shape
# may move a pixel; the fastest for onnxruntime CUDA and generate end to end on an H200 (BENCHMARKS.md)
GPU_BATCH = 256
ORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


@dataclass
class Backend:
    """A loaded model: call it with noise, read what really runs from `provider` and `settings`."""

    name: str
    path: Path
    provider: str
    metadata: dict[str, Any]
    run: Callable[[np.ndarray], np.ndarray]
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    bound: "IOBound | None" = None  # onnxruntime on a GPU: the session's device-resident binding
    sha256: str = ""  # of the bytes loaded, where the backend read them itself (a checkpoint)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["latent_shape"])

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(z, dtype=np.float32))


def cores() -> int:
    """The cores this process may use: its CPU affinity, divided among the ranks of a torchrun node."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_threads() -> int:
    """The cores inference takes while PNG writers run: one on a machine of at most 2 cores, else all but
    one (at most 4). The torch backends use them as intra-op threads, onnxruntime as streams on more than
    2 cores (`png_streams`).

    Measured on the quiet 2-core dev CPU with benchmarks/bench_generate.py, generate --count 10000 to
    PNGs with 2 writer threads, 1 vs 2 intra-op threads (2026-11-27): trained MNIST dcgan 4198 vs 4109
    img/s end to end (pure inference 4548 vs 5493), seed arch 1533 vs 1389 (pure 1787 vs 3405). The
    second thread speeds up inference alone but takes the core the writers need. Batch size hardly
    moves onnxruntime on the CPU (4576/4556/4530 img/s at 1/64/256 on the dcgan), so generate keeps
    256; the torch routes peak near 64 (FIXED_BATCH).
    """
    n = cores()
    return 1 if n <= 2 else min(4, n - 1)


def png_streams() -> int:
    """onnxruntime's CPU streams while PNG writers run: every core on a machine of at most 2 (the writers
    share them), else `default_threads()`. On the 2-core CPU, generate --count 10000 to PNGs, 4
    interleaved rounds with the output folders kept (2026-11-30): 2 streams 2,667 img/s, 1 stream 2,237
    (2 streams with 1 / 3 writers: 2,602 / 2,465). Only measured on 2 cores."""
    n = cores()
    return n if n <= 2 else default_threads()


def cpu_settings(settings: dict[str, Any]) -> tuple[int | None, int]:
    """(intra-op threads, streams) from a backend's `settings` (onnxruntime and torch name threads apart);
    threads None on a GPU."""
    return settings.get("intra_op_num_threads", settings.get("threads")), settings.get("streams") or 1


def open_backend(kind: str, path: str | Path, *, provider: str = "auto", batch_size: int = 256,
                 threads: int | None = None, streams: int | None = None, fmt: str = "png") -> Backend:
    """Load `path` as backend `kind`; UsageError/CheckpointError before anything runs if it cannot.

    `streams` (onnxruntime on the CPU): that many concurrent runs, each on its own slice of the batch
    with `threads` intra-op threads (OpenVINO's throughput streams). Defaults: `cpu_plan` for the output
    format `fmt`."""
    if kind not in BACKENDS:
        raise UsageError(f"unknown backend {kind!r} (choose from {', '.join(BACKENDS)})")
    if provider not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model not found: {path}")
    _check_kind(kind, path)
    plan = cpu_plan(kind, threads, streams, fmt=fmt)
    if kind == "onnxruntime":
        return _open_onnx(path, provider=provider, batch_size=batch_size, plan=plan, streams_asked=streams)
    opener = {"torchscript": _open_torchscript, "torch": _open_torch}[kind]
    return opener(path, provider=provider, batch_size=batch_size, threads=plan[0])


_TAKES = {"onnxruntime": "onnx", "torchscript": "torchscript", "torch": "checkpoint"}
_NAMES = {"onnx": "an ONNX model", "torchscript": "a TorchScript export", "checkpoint": "a PyTorch checkpoint"}


def _check_kind(kind: str, path: Path) -> None:
    """A PyTorch file handed to the wrong backend is named for what it is, with the backend that takes it."""
    from .exporters import export_kind

    found = export_kind(path)
    if found == "onnx" and kind != "onnxruntime":
        raise UsageError(f"{path} is not a PyTorch file, which --backend {kind} takes; an ONNX model takes "
                         f"--backend onnxruntime")
    if found != _TAKES[kind] and found != "onnx":
        takes = {"torchscript": "--backend torchscript",
                 "checkpoint": f"--backend torch, or export it first (gantk export --checkpoint {path})"}[found]
        raise UsageError(f"{path} is {_NAMES[found]}, not {_NAMES[_TAKES[kind]]}; pass {takes}")


def cpu_plan(kind: str, threads: int | None, streams: int | None, *, fmt: str = "png") -> tuple[int, int]:
    """(intra-op threads, streams) for backend `kind` on the CPU, defaults filled in.

    onnxruntime's default is one thread per stream, as many streams as inference gets cores: all of them
    for `.npy` (no PNGs to write; at most MAX_STREAMS), `png_streams()` for PNGs (streams change no
    byte). The torch backends keep `default_threads()` intra-op threads for every format: in bf16 their
    sums depend on the thread count (1e-4), and npy must hold the PNGs' pixels. Streams use the
    cores better than intra-op threads: on the 2-core CPU, 2 streams of 1 thread ran 1.4-1.5x as fast as
    1 stream of 2 threads (2026-11-30 and 12-01, BENCHMARKS.md); generate
    --count 10000 --format npy 3,734 against 2,486-2,575 img/s. Only measured on 2 cores. `--threads`
    alone means one stream of that many threads."""
    for name, v in (("--threads", threads), ("--streams", streams)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be at least 1, got {v}")
    if streams is not None and streams > 1 and kind != "onnxruntime":
        raise UsageError(f"--streams is for --backend onnxruntime (on the CPU), not {kind}")
    if kind != "onnxruntime":  # the same threads for every format: torch's bf16 sums depend on them
        return threads or default_threads(), 1
    if threads is None and streams is None:
        return 1, min(cores(), MAX_STREAMS) if fmt == "npy" else png_streams()
    return threads or 1, streams or 1


# ------------------------------------------------------------------------------------------ metadata


def check_metadata(meta: dict[str, str], path: Path) -> dict[str, Any]:
    """Validate gantk's export metadata (all values strings) and return it with latent_shape parsed."""
    from .exporters import check

    check(meta, path)
    try:
        latent = tuple(int(v) for v in json.loads(meta["latent_shape"]))
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(f"{path}: gantk metadata has no valid latent_shape") from None
    if meta.get("input_name", "z") != "z" or meta.get("output_name", "image") != "image":
        raise CheckpointError(f"{path}: gantk metadata names I/O other than z -> image")
    return {**meta, "latent_shape": latent}


NO_DEVICE = "no CUDA device is visible (torch.cuda.is_available() is False)"
NO_GPU = "no NVIDIA device for CUDA (no /dev/nvidiactl)"
NVIDIA_GPUS = "/proc/driver/nvidia/gpus"  # one entry per GPU the NVIDIA driver sees (Linux)
# CUDA opens one of these on Linux: the driver's control device, WSL 2's GPU, a Jetson's (Tegra) memory map
GPU_DEVICES = ("/dev/nvidiactl", "/dev/dxg", "/dev/nvmap")


def no_nvidia_gpu() -> bool:
    """True on Linux without the device files CUDA opens: CUDA cannot run there. (/proc/driver/nvidia/gpus
    is no such sign: some container runtimes hide it while the GPUs work.)"""
    return sys.platform.startswith("linux") and not any(os.path.exists(d) for d in GPU_DEVICES)


def _cuda_reason() -> str | None:
    """Why torch cannot run CUDA here, or None. Importing torch first also makes its CUDA libraries visible;
    without a GPU, nothing is imported (torch takes about 2 s to import, which a CPU run may not need)."""
    if no_nvidia_gpu():
        return NO_GPU
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return NO_DEVICE
    return None


def _ort_cuda_reason(ort, reason: str | None) -> str | None:
    """CUDA for onnxruntime: a CUDA torch imported first lends its libraries and knows if a device is there;
    without one, `onnxruntime.preload_dlls()` loads them from the nvidia wheels and the session decides."""
    if reason is None or reason in (NO_DEVICE, NO_GPU):
        return reason
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(sys.stderr):  # it prints what it could not load
            ort.preload_dlls(directory=None)
    return None


# ------------------------------------------------------------------------------------------ onnxruntime


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("onnxruntime is not installed: pip install onnxruntime-gpu (or onnxruntime)") from None
    return ort


def _open_onnx(path: Path, *, provider: str, batch_size: int, plan: tuple[int, int],
               streams_asked: int | None) -> Backend:
    reason = None if provider == "cpu" else _cuda_reason()  # torch first: its CUDA libs become visible
    ort = _import_ort()
    reason = None if provider == "cpu" else _ort_cuda_reason(ort, reason)
    wanted, warnings = _wanted_provider(ort, provider, reason)
    # the CPU plan is the CPU's; a GPU session keeps the intra-op threads it was measured with
    threads, streams = plan if wanted == "cpu" else (default_threads(), 1)
    session = _session(ort, path, wanted=wanted, threads=threads)
    active = _active_provider(session.get_providers())
    if active != wanted:
        warnings += _not_active(provider, wanted, active, reason)
    if active != "cpu" and (streams_asked or 1) > 1:
        warnings.append(f"--streams {streams_asked} is for the CPU provider; {active} runs one stream")
        log.warning(warnings[-1])
    meta = check_metadata(session.get_modelmeta().custom_metadata_map, path)
    _check_io(session, meta, path)
    bound = IOBound(ort, session, meta["latent_shape"], batch_size) if active != "cpu" else None
    cpu = active == "cpu"
    run = fixed_batch(bound, batch_size, meta["latent_shape"]) if bound is not None \
        else in_streams(lambda z: session.run(["image"], {"z": z})[0], streams)
    settings = {"intra_op_num_threads": threads if cpu else None, "streams": streams if cpu else None,
                "providers": session.get_providers(), "fixed_batch": None if cpu else batch_size}
    return Backend("onnxruntime", path, active, meta, run, settings, warnings, bound)


def in_streams(run: Callable[[np.ndarray], np.ndarray], streams: int) -> Callable[[np.ndarray], np.ndarray]:
    """`run` on `streams` slices of each batch at once (onnxruntime releases the GIL while it runs). The
    images are those of one call: onnxruntime on the CPU is batch-size invariant (tests/test_generate.py)."""
    if streams <= 1:
        return run
    pool = ThreadPoolExecutor(streams, thread_name_prefix="gantk-stream")

    def split(z: np.ndarray) -> np.ndarray:
        if len(z) < 2:
            return run(z)
        return np.concatenate(list(pool.map(run, np.array_split(z, min(streams, len(z))))))

    return split


def _wanted_provider(ort, provider: str, reason: str | None) -> tuple[str, list[str]]:
    available = ort.get_available_providers()
    if provider == "auto":
        if reason is None and ORT_NAMES["cuda"] in available:
            return "cuda", []
        return "cpu", _auto_on_cpu(reason or "onnxruntime was built without CUDAExecutionProvider")
    if ORT_NAMES[provider] not in available:
        raise UsageError(f"provider {provider} requested but this onnxruntime ({ort.__version__}) has no "
                         f"{ORT_NAMES[provider]} (available: {', '.join(available)})")
    if provider != "cpu" and reason is not None:
        raise UsageError(f"provider {provider} requested but not usable: {reason}")
    return provider, []


def _auto_on_cpu(reason: str) -> list[str]:
    """`auto` falls back to the CPU: said quietly on a machine without an NVIDIA GPU, as a warning where
    one is there but cannot be used (returned for the summary)."""
    msg = f"provider auto: CUDA not usable ({reason}); running on the CPU"
    if not any(Path(NVIDIA_GPUS).glob("*")):
        log.debug(msg)
        return []
    log.warning(msg)
    return [msg]


def _not_active(provider: str, wanted: str, active: str, reason: str | None) -> list[str]:
    cause = reason or f"onnxruntime could not create {ORT_NAMES[wanted]} (see its log with --debug)"
    if provider != "auto":
        raise UsageError(f"provider {provider} requested but not active after session creation "
                         f"(running: {active}): {cause}")
    msg = f"provider auto: {ORT_NAMES[wanted]} did not start ({cause}); running on {active}"
    log.warning(msg)
    return [msg]


def _active_provider(names: list[str]) -> str:
    inverse = {v: k for k, v in ORT_NAMES.items()}
    return inverse.get(names[0], names[0]) if names else "cpu"


def _session(ort, path: Path, *, wanted: str, threads: int):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # spinning starves the writers
    so.log_severity_level = 0 if log.isEnabledFor(logging.DEBUG) else 4
    try:
        with contextlib.redirect_stdout(sys.stderr):  # a provider that fails to start prints there (--json!)
            return ort.InferenceSession(str(path), so, providers=_provider_list(wanted))
    except Exception as e:  # InvalidProtobuf, Fail, ...: not a loadable ONNX model
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a loadable ONNX model ({first[:160]})") from None


def _device_id() -> int:
    """The GPU of this process: torchrun's LOCAL_RANK, else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _provider_list(wanted: str) -> list:
    """CUDA with TF32 off (parity); TensorRT in fp32, its engine built once for our one fixed shape."""
    dev = _device_id()
    cuda = ("CUDAExecutionProvider", {"device_id": dev, "use_tf32": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"})
    trt = ("TensorrtExecutionProvider", {"device_id": dev, "trt_fp16_enable": "False"})
    return {"cpu": ["CPUExecutionProvider"], "cuda": [cuda, "CPUExecutionProvider"],
            "tensorrt": [trt, cuda, "CPUExecutionProvider"]}[wanted]


def _check_io(session, meta: dict[str, Any], path: Path) -> None:
    ins, outs = session.get_inputs(), session.get_outputs()
    if [i.name for i in ins] != ["z"] or "image" not in [o.name for o in outs]:
        raise CheckpointError(f"{path}: expected input 'z' and output 'image', found "
                              f"{[i.name for i in ins]} -> {[o.name for o in outs]}")
    if ins[0].type != "tensor(float)" or list(ins[0].shape[1:]) != list(meta["latent_shape"]):
        raise CheckpointError(f"{path}: input z is {ins[0].type} {ins[0].shape}, metadata says "
                              f"float32 (N, {', '.join(map(str, meta['latent_shape']))})")


class IOBound:
    """An onnxruntime session bound to one fixed input shape on the GPU, its output in a device buffer.

    `run()` is pure device-resident inference (what `gantk bench` times); `__call__` adds the copies
    from and to host memory that `generate` needs."""

    def __init__(self, ort, session, latent: tuple[int, ...], batch: int, *, device: str = "cuda"):
        self.session, self.binding = session, session.io_binding()
        dev = _device_id() if device == "cuda" else 0
        self.z = ort.OrtValue.ortvalue_from_shape_and_type((batch, *latent), np.float32, device, dev)
        self.out = ort.OrtValue.ortvalue_from_shape_and_type((batch, *IMAGE_SHAPE), np.float32, device, dev)
        self.binding.bind_ortvalue_input("z", self.z)
        self.binding.bind_ortvalue_output("image", self.out)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)  # returns once the device has finished

    def __call__(self, z: np.ndarray) -> np.ndarray:
        self.z.update_inplace(z)
        self.run()
        return self.out.numpy()


def fixed_batch(run: Callable[[np.ndarray], np.ndarray], batch: int, latent: tuple[int, ...]) -> Callable:
    """Wrap `run` so it only ever sees (batch, *latent): split larger inputs, zero-pad the last chunk."""

    def call(z: np.ndarray) -> np.ndarray:
        outs = []
        for lo in range(0, len(z), batch):
            chunk = z[lo:lo + batch]
            n = len(chunk)
            if n < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - n, *latent), np.float32)])
            outs.append(run(chunk)[:n].copy())
        return np.concatenate(outs) if outs else np.zeros((0, *IMAGE_SHAPE), np.float32)

    return call


# ------------------------------------------------------------------------------------------ torch


def _torch_device(provider: str) -> str:
    if provider == "tensorrt":
        raise UsageError("provider tensorrt is only available with --backend onnxruntime")
    reason = None if provider == "cpu" else _cuda_reason()
    if provider == "cuda" and reason:
        raise UsageError(f"provider cuda requested but not usable: {reason}")
    if provider == "auto" and reason:
        _auto_on_cpu(reason)
    return "cuda" if reason is None and provider != "cpu" else "cpu"


def _torch_runner(module, device: str, batch: int, latent: tuple[int, ...], threads: int) -> Callable:
    import torch

    if device != "cpu":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def run(z: np.ndarray) -> np.ndarray:
        # the thread count for this call only: it is the whole process's (eval embeds with torch after)
        before = torch.get_num_threads()
        if device == "cpu":
            torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return module(torch.from_numpy(z).to(device)).float().cpu().numpy()
        finally:
            torch.set_num_threads(before)

    return fixed_batch(run, batch, latent)


def _open_torchscript(path: Path, *, provider: str, batch_size: int, threads: int) -> Backend:
    import torch

    from .exporters import check_crcs
    from .exporters.torchscript import _quiet_jit

    # the device before loading: a frozen module's weights are constants, which only map_location moves
    # (Module.to finds no parameters to move)
    device = _torch_device(provider)
    extra = {"gantk.json": ""}
    check_crcs(path, "TorchScript file")
    try:
        with _quiet_jit():  # torch's deprecation notice for torch.jit, on every load
            module = torch.jit.load(str(path), map_location=_target(device), _extra_files=extra)
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a loadable TorchScript file ({first[:160]})") from None
    try:
        meta = check_metadata(json.loads(extra["gantk.json"] or "{}"), path)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: gantk.json in the TorchScript file is not JSON") from None
    return _torch_backend("torchscript", path, module, meta, device, batch_size, threads)


def _open_torch(path: Path, *, provider: str, batch_size: int, threads: int) -> Backend:
    from .checkpoint import generator_from, load_hashed

    state, sha256 = load_hashed(path)
    meta = _checkpoint_meta(path, state, sha256, dtype="float32")
    be = _torch_backend("torch", path, generator_from(state), meta, _torch_device(provider), batch_size, threads)
    return replace(be, sha256=sha256)


def _checkpoint_meta(path: Path, state: dict[str, Any], sha256: str, *, dtype: str) -> dict[str, Any]:
    return {"kind": "gantk-generator", "gantk_format": "1", "arch": state["config"]["arch"],
            "latent_shape": tuple(state["latent_shape"]), "output_range": "[-1, 1]", "dtype": dtype,
            "source_checkpoint": str(path.resolve()), "source_sha256": sha256, "step": str(state["step"])}


def _target(device: str) -> str:
    return device if device == "cpu" else f"cuda:{_device_id()}"


def _torch_backend(name, path, module, meta, device, batch_size, threads) -> Backend:
    target = _target(device)
    module = module.to(target).eval()
    batch = FIXED_BATCH if device == "cpu" else batch_size
    run = _torch_runner(module, target, batch, tuple(meta["latent_shape"]), threads)
    settings = {"device": device, "fixed_batch": batch, "threads": threads if device == "cpu" else None}
    warnings = []
    if device == "cpu" and meta.get("dtype") == "bf16" and not native_bf16():
        warnings.append("this CPU has neither AVX512-BF16 nor AMX: the bf16 model runs emulated, 3x (AVX-512) to "
                        "80x (AVX2) slower than fp32; use the fp32 export")
        log.warning(warnings[-1])
    return Backend(name, path, device, meta, run, settings, warnings)


def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), from the CPU flags torch reads."""
    import torch

    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(p() for p in probes if p is not None)

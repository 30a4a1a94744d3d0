"""TorchScript export of a gantk generator: scripted, frozen, validated after reloading from disk.

`torch.jit.script` (not `trace`) so no shape is baked in at tracing; `torch.jit.freeze` inlines the
weights as constants for inference. BatchNorm is folded in torch first, the dcgan's noise projection
becomes a Linear and the stride-1 transposed convs with one input or output channel become convs (on the
2-core AVX2 CPU torch's transposed conv ran the seed generator's other layers 2x faster than the padded
conv the ONNX export uses; on the AVX-512 CPU of 2026-11-26 the padded convs had measured 30% faster
overall: `fold.stride1_as_conv`). The metadata travels in
`_extra_files={"gantk.json": ...}`, so a program that imports only torch reads it with
`torch.jit.load(path, _extra_files={"gantk.json": ""})`. fp32, or bf16 (`fold.channels_last`: channels_last,
bf16 after the first layer, float32 in and out; for CPUs with AVX512-BF16 or AMX, about 1.6x fp32 here but
up to 2-3 uint8 levels off); fp16 is an ONNX option.

torch (2.14 and 2.15 here) marks torch.jit as deprecated (FutureWarning on every call); TorchScript is
still what a torch-only C++/Python program loads without gantk, so we keep it and silence that warning here.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path

from gantk.errors import UsageError

from .base import (ExportReport, Source, as_source, check_dtype, commit, destination, metadata, report, staged,
                   versions)
from .fold import channels_last, for_inference

FORMAT = "torchscript"
log = logging.getLogger("gantk")
SUFFIX = ".pt"
EXTRA_FILE = "gantk.json"


def export(source: Source | str | Path, out: str | Path, *, opset: int | None = None, dtype: str = "fp32",
           atol: float | None = None) -> ExportReport:
    """Export `source` (a checkpoint path or a Source) to `out`; VerificationError if it does not match."""
    from . import validate

    check_options(opset=opset, dtype=dtype)
    atol = validate.tolerance(dtype, atol)
    src = as_source(source)
    out = destination(out, suffix=SUFFIX)
    from gantk.backends import native_bf16

    if dtype == "bf16" and not native_bf16():
        log.warning("this CPU has neither AVX512-BF16 nor AMX: the bf16 export is validated in emulated bf16, "
                    "slowly; it runs fast only on CPUs that have them")
    t0 = time.perf_counter()
    if dtype != "fp32":
        validate.check_rewrite(channels_last(src.generator.cpu(), dtype="fp32"), src.generator,
                               what=f"TorchScript export ({dtype})")
    with staged(out) as tmp:
        _save(_build(src, dtype), tmp, metadata(src, dtype=dtype, versions=versions("torch")))
        parity = validate.compare(_runner(tmp), src.generator, atol=atol)
        validate.require(parity, what=f"TorchScript export of {src.checkpoint or src.arch}")
        commit(tmp, out)
    return report(FORMAT, src, out, parity, opset=None, dtype=dtype, seconds=time.perf_counter() - t0)


def check_options(*, opset: int | None, dtype: str) -> None:
    check_dtype(dtype)
    if opset is not None:
        raise UsageError("--opset applies to ONNX only")
    if dtype == "fp16":
        raise UsageError("fp16 is an ONNX option; use --format onnx --dtype fp16 (TorchScript: fp32 or bf16)")


def _build(src: Source, dtype: str = "fp32"):
    """Scripted and frozen, from the generator with BatchNorm folded."""
    import torch

    g = _prepare(src.generator) if dtype == "fp32" else channels_last(src.generator.cpu(), dtype=dtype)
    with _quiet_jit():
        return torch.jit.freeze(torch.jit.script(g))


def _prepare(generator):
    """The module that is scripted. (Tests replace this to show that batch dependence fails validation.)"""
    return for_inference(generator.cpu(), convs="thin")


def _save(module, path: Path, meta: dict[str, str]) -> None:
    """Through a buffer: saved to a path, torch names the archive's folder after the (temp) file, so two
    exports of one checkpoint would differ in bytes, and a digits folder would take the second for
    another model."""
    import torch

    buf = io.BytesIO()
    with _quiet_jit():
        torch.jit.save(module, buf, _extra_files={EXTRA_FILE: json.dumps(meta, sort_keys=True)})
    path.write_bytes(buf.getvalue())


def _runner(path: Path):
    """The file as a fresh `torch.jit.load` sees it, not the module still in memory."""
    import torch

    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(z):
        with torch.inference_mode():
            return module(torch.from_numpy(z)).numpy()

    return run


@contextlib.contextmanager
def _quiet_jit():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*is deprecated", FutureWarning, r"torch\.jit")
        yield

"""What every exporter shares: the source generator, the metadata, the report, and the staged write.

An export is built into a temp file in the destination folder, validated there, and only then moved
onto the destination with `os.replace`; a failed export leaves the destination as it was.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from gantk.errors import CheckpointError, GantkError, UsageError, VerificationError

FORMAT_VERSION = "1"
KIND = "gantk-generator"
INPUT_NAME = "z"
OUTPUT_NAME = "image"
OUTPUT_RANGE = "[-1, 1]"
META_KEYS = ("gantk_format", "kind", "arch", "latent_shape", "output_range", "input_name", "output_name",
             "dtype", "source_checkpoint", "source_sha256", "step", "versions")
DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Source:
    """The eager generator an export is made from, and where it came from."""

    generator: Any
    arch: str
    latent_shape: tuple[int, ...]
    checkpoint: str = ""
    sha256: str = ""
    step: int = 0

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Source":
        from gantk import checkpoint

        path = checkpoint.resolve(path)
        state, sha256 = checkpoint.load_hashed(path)  # of the bytes loaded: training may replace last.pt meanwhile
        g = checkpoint.generator_from(state)
        return cls(g, state["config"]["arch"], tuple(g.latent_shape), str(path.resolve()), sha256,
                   int(state.get("step", 0)))

    @classmethod
    def from_generator(cls, g, *, arch: str) -> "Source":
        """A generator with no checkpoint behind it (tests, notebooks); the metadata says so."""
        return cls(g.eval().requires_grad_(False), arch, tuple(g.latent_shape))


def as_source(source: "Source | str | Path") -> Source:
    return source if isinstance(source, Source) else Source.from_checkpoint(source)


def metadata(source: Source, *, dtype: str, versions: dict[str, str]) -> dict[str, str]:
    """The gantk metadata every export carries; all values are strings (ONNX metadata_props are)."""
    return {
        "gantk_format": FORMAT_VERSION, "kind": KIND, "arch": source.arch,
        "latent_shape": json.dumps(list(source.latent_shape)), "output_range": OUTPUT_RANGE,
        "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "dtype": dtype,
        "source_checkpoint": source.checkpoint, "source_sha256": source.sha256,
        "step": str(source.step), "versions": json.dumps(versions, sort_keys=True),
    }


def versions(*modules: str) -> dict[str, str]:
    """gantk's version and those of the named, already importable modules."""
    import importlib

    from gantk import __version__

    out = {"gantk": __version__}
    for name in modules:
        out[name] = str(getattr(importlib.import_module(name), "__version__", "unknown"))
    return out


@dataclass
class ExportReport:
    """What `export` did and how well the file matched the eager generator."""

    format: str
    path: str
    sha256: str
    size_bytes: int
    dtype: str
    arch: str
    source_checkpoint: str
    step: int
    opset: int | None
    torch_version: str
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    pixels_off: float           # share of uint8 pixels that differ after round((x + 1) * 127.5)
    batch_consistency: float    # max |export(z[:n]) - export(z[:256])[:n]| over the batch sizes
    atol: float
    seconds: float              # build + validate + move, in all
    validate_seconds: float
    per_batch: dict[int, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        d["per_batch"] = {str(k): v for k, v in self.per_batch.items()}
        return d


def report(fmt: str, src: Source, out: Path, parity, *, opset: int | None, dtype: str,
           seconds: float) -> ExportReport:
    """The report of a validated export now at `out`."""
    import torch

    from gantk.checkpoint import sha256

    return ExportReport(
        format=fmt, path=str(out), sha256=sha256(out), size_bytes=out.stat().st_size, dtype=dtype,
        arch=src.arch, source_checkpoint=src.checkpoint, step=src.step, opset=opset,
        torch_version=str(torch.__version__), batch_sizes=parity.batch_sizes,
        max_abs_diff=parity.max_abs_diff, mean_abs_diff=parity.mean_abs_diff, pixels_off=parity.pixels_off,
        batch_consistency=parity.batch_consistency, atol=parity.atol, seconds=seconds,
        validate_seconds=parity.seconds, per_batch=parity.per_batch)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")


EXPORT_SUFFIXES = {".onnx": "ONNX", ".pt": "TorchScript"}


def destination(out: str | Path, *, suffix: str) -> Path:
    """`out` as an absolute path in a writable place (its folders are made by `staged`); UsageError if it is
    a folder, a file that is not a gantk export (the user's, or the checkpoint itself: only exports are
    replaced), or named with the other format's suffix."""
    from gantk.checkpoint import check_writable

    from . import read_metadata

    out = Path(out).expanduser().absolute()
    if out.suffix in EXPORT_SUFFIXES and out.suffix != suffix:
        raise UsageError(f"--out {out}: {out.suffix} names a {EXPORT_SUFFIXES[out.suffix]} file; this export "
                         f"is {EXPORT_SUFFIXES[suffix]} (name it *{suffix})")
    if out.is_dir():
        raise UsageError(f"--out is an existing directory: {out} (give a file path)")
    if out.exists():
        try:
            read_metadata(out)
        except CheckpointError as e:
            why = str(e).removeprefix(f"{out}: ").removeprefix(f"{out} ")
            raise UsageError(f"--out {out} exists and is not a gantk export ({why}); not "
                             "overwriting it (move it away or choose another --out)") from None
    check_writable(out, "--out")
    return out


STALE_TEMP_S = 3600  # an export takes seconds: a temp file this old beside `out` is a killed export's


def _drop_stale_temps(out: Path, mine: Path) -> None:
    """Remove the temp files that killed exports (SIGKILL, power) of `out` left beside it."""
    now = time.time()
    for p in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if p != mine and now - p.stat().st_mtime > STALE_TEMP_S:
                p.unlink()


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temp path beside `out` (its folders made); removed on the way out unless `commit` moved it into
    place, and so are the folders made here when nothing landed.

    A VerificationError raised inside gains a note that `out` was not touched.
    """
    from gantk.checkpoint import missing_folders, remove_empty

    made = missing_folders(out.parent)
    tmp = None
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        except OSError as e:
            raise GantkError(f"cannot write in {out.parent}: {e.strerror or e}") from None
        os.close(fd)
        tmp = Path(name)
        _drop_stale_temps(out, tmp)
        yield tmp
    except VerificationError as e:
        state = "left unchanged" if out.exists() else "nothing written"
        raise VerificationError(f"{e}; {state}: {out}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if not out.exists():
            remove_empty(made)


def commit(tmp: Path, out: Path) -> None:
    """fsync the validated temp file and move it onto `out` atomically."""
    from gantk.checkpoint import file_mode, fsync_dir

    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, file_mode())  # mkstemp made it 0600; an export is an ordinary file
    os.replace(tmp, out)
    fsync_dir(out.parent)

"""Exporters: one module per format, the same call, the same ExportReport.

    EXPORTERS[fmt](source, out, *, opset=None, dtype="fp32", atol=None) -> ExportReport

`source` is a checkpoint path (or run folder) or a `Source`; every export is validated against the
eager generator before it lands at `out`. `read_metadata` reads gantk's metadata back from an export.
"""
from __future__ import annotations

import errno
import io
import json
import zipfile
from pathlib import Path
from typing import Callable

from gantk.errors import CheckpointError, DamagedFileError

from . import onnx, torchscript
from .base import FORMAT_VERSION, KIND, META_KEYS, ExportReport, Source

EXPORTERS: dict[str, Callable[..., ExportReport]] = {
    "onnx": onnx.export,
    "torchscript": torchscript.export,
}
SUFFIXES = {"onnx": onnx.SUFFIX, "torchscript": torchscript.SUFFIX}


def check_options(fmt: str, *, opset: int | None, dtype: str) -> None:
    """UsageError for a combination `EXPORTERS[fmt]` refuses, before anything is loaded or named."""
    {"onnx": onnx, "torchscript": torchscript}[fmt].check_options(opset=opset, dtype=dtype)

__all__ = ["EXPORTERS", "SUFFIXES", "ExportReport", "Source", "check_options", "default_out", "read_metadata",
           "export_kind"]


def default_out(checkpoint: str | Path, fmt: str, dtype: str = "fp32") -> Path:
    """runs/<run>/export/generator.onnx (or .pt; generator-fp16.onnx, generator-bf16.pt in reduced precision,
    so they never replace the fp32 file generate uses by default) for a checkpoint in runs/<run>/checkpoints/."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run / "export" / f"generator{'' if dtype == 'fp32' else '-' + dtype}{SUFFIXES[fmt]}"


def export_kind(path: str | Path) -> str:
    """'torchscript', 'checkpoint' (a torch.save zip) or 'onnx' (anything else, parsed later); CheckpointError
    for an empty file or a PyTorch zip cut short."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise DamagedFileError(f"{path}: empty file (0 bytes)")
    if head != b"PK\x03\x04":
        return "onnx"
    names = _zip_names(path)
    script = any(n.endswith(("/constants.pkl", "/extra/" + torchscript.EXTRA_FILE)) or "/code/" in n for n in names)
    return "torchscript" if script else "checkpoint"


def read_metadata(path: str | Path) -> dict[str, str]:
    """gantk's metadata from an .onnx or TorchScript file; CheckpointError (exit 2) if it is not an export."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"export not found: {path}")
    kind = export_kind(path)
    if kind == "checkpoint":
        raise CheckpointError(f"{path}: a torch checkpoint, not a gantk export")
    meta = _torchscript_metadata(path) if kind == "torchscript" else _onnx_metadata(path)
    check(meta, path)
    return meta


def _zip(path: str | Path, data: bytes | None) -> zipfile.ZipFile:
    return zipfile.ZipFile(path if data is None else io.BytesIO(data))


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except zipfile.BadZipFile:
        raise DamagedFileError(f"{path}: a PyTorch file cut short or corrupt") from None


def check_crcs(path: str | Path, what: str, *, data: bytes | None = None) -> None:
    """DamagedFileError where a member of the PyTorch zip at `path` (or its bytes `data`) no longer reads
    back as saved (its CRC-32, or its header). torch.load and torch.jit.load do not check, so a bit flipped
    on disk would load as a wrong weight. A member stored with CRC 0 (torch's `set_crc32_options(False)`)
    is not checked."""
    member = None
    try:
        with _zip(path, data) as z:
            for info in z.infolist():
                if info.CRC == 0 and info.file_size:
                    continue
                member = info.filename.partition("/")[2] or info.filename  # less the archive's own folder
                with z.open(info) as f:  # zipfile compares the CRC-32 at the member's end
                    while f.read(1 << 20):
                        pass
    except Exception as e:  # BadZipFile, and EOFError, ValueError, OSError(EINVAL)... from a damaged header
        if isinstance(e, OSError) and e.errno not in (None, errno.EINVAL):
            raise  # the disk failed, not the file
        if isinstance(e, zipfile.BadZipFile) and "CRC" in str(e):
            raise DamagedFileError(f"{path}: a damaged {what} ({member} does not match the CRC-32 it was "
                                   "saved with)") from None
        at = f" at {member}" if member else ""
        raise DamagedFileError(f"{path}: a damaged {what} (a PyTorch zip cut short or corrupt{at})") from None


def _torchscript_metadata(path: Path) -> dict[str, str]:
    """extra/gantk.json straight from the zip: no torch import, no code run."""
    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith("/extra/" + torchscript.EXTRA_FILE)), None)
        if name is None:
            raise CheckpointError(f"{path}: a TorchScript file without gantk metadata (no {torchscript.EXTRA_FILE})")
        try:
            meta = json.loads(z.read(name))
        except (ValueError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: unreadable {torchscript.EXTRA_FILE} ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: {torchscript.EXTRA_FILE} is not a JSON object")
    return {str(k): str(v) for k, v in meta.items()}


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx as onnx_lib

    try:
        model = onnx_lib.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path}: not a gantk checkpoint, ONNX or TorchScript file ({reason})") from None
    return {p.key: p.value for p in model.metadata_props}


def check(meta: dict[str, str], path: Path) -> None:
    """CheckpointError naming `path` unless `meta` is gantk export metadata this version can read."""
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a gantk export (no kind={KIND!r} in its metadata)")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: gantk metadata lacks {', '.join(missing)}")
    if not meta["gantk_format"].isdigit() or int(meta["gantk_format"]) > int(FORMAT_VERSION):
        raise CheckpointError(f"{path}: export format {meta['gantk_format']!r} is newer than this gantk "
                              f"({FORMAT_VERSION})")

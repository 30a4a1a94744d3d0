"""Checkpoints: atomic save, safe load (weights_only, never a fallback), and finding the newest one.

A checkpoint is a dict of tensors and plain values:
  format, kind="gantk-checkpoint", versions, config (TrainConfig as a dict), latent_shape,
  step, epoch, batch_in_epoch, images_seen, elapsed_s, best_fid, fid_reference (the key of best_fid's
  yardstick), world_size, rank_checksums,
  generator, discriminator, ema (or None), opt_g, opt_d, scaler (or None), rng, meter.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UsageError

FORMAT = 1
KIND = "gantk-checkpoint"
NUMBERED = re.compile(r"step-(\d+)\.pt")  # a run's numbered checkpoints (`--keep` prunes them)


def atomic_write(path: Path, write) -> None:
    """Call `write(file)` on a temp file in `path`'s folder, fsync, then `os.replace` onto `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def file_mode() -> int:
    """The mode a new file gets under the current umask (mkstemp's 0600 would surprise a user)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read where Linux shows it: setting it to read it back would leave it 0 for a
    moment, in which another thread's new file would be world-writable."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def existing_ancestor(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists: where the folders for a new `path` would start."""
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: Path, flag: str) -> None:
    """Before any work: the folder a new file `path` goes in is there, or can be made, and is writable.
    UsageError where a file stands in its way; GantkError (exit 1) where the folder is not writable."""
    from .errors import GantkError

    probe = existing_ancestor(Path(path).absolute().parent)
    if not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise GantkError(f"{flag} {path}: {probe} is not writable")


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those above it that do not exist yet, innermost first (for `remove_empty`)."""
    return [d for d in (folder, *folder.parents) if not d.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove each folder that is still empty, innermost first: what a failed write made, and only that."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            pass


def save(state: dict[str, Any], path: Path) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(state, f))


def read_weights_only(path: str | Path, *, what: str = "gantk checkpoint", missing: str = "checkpoint not found",
                      map_location: str = "cpu") -> Any:
    """`torch.load(weights_only=True)`, never a fallback; CheckpointError naming the path otherwise."""
    return _read_weights_only(path, what=what, missing=missing, map_location=map_location)[0]


def _read_weights_only(path: str | Path, *, what: str, missing: str, map_location: str) -> tuple[Any, bytes]:
    """The loaded object and the bytes it came from: one read, so the CRCs checked, the weights loaded and a
    sha256 of them are of the same file, even where training replaces it meanwhile."""
    import torch

    from .exporters import check_crcs, export_kind

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{missing}: {path}")
    kind = export_kind(path)  # CheckpointError for an empty or cut-short file; from the header, not a full read
    if kind == "onnx":
        raise CheckpointError(f"{path}: not a readable {what} (not a PyTorch zip archive)")
    if kind == "torchscript":
        raise CheckpointError(f"{path} is a TorchScript file, not a {what}")
    raw = path.read_bytes()
    check_crcs(path, what, data=raw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns before it raises; the one line below says it
            return torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True), raw
    except Exception as e:  # truncated zip, pickle refused by weights_only, not a torch file...
        text = str(e)
        refused = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
        reason = (f"it holds {refused.group(1)}, which weights_only=True loading refuses" if refused
                  else next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)[:160])
        raise CheckpointError(f"{path}: not a readable {what} ({reason})") from None


def intact(path: Path) -> bool:
    """Whether the zip at `path` reads back as saved (every member's CRC-32), without loading it."""
    from .exporters import check_crcs

    try:
        check_crcs(path, "gantk checkpoint")
    except (CheckpointError, OSError):
        return False
    return True


def load(path: str | Path, *, map_location: str = "cpu") -> dict[str, Any]:
    """Load a gantk checkpoint with weights_only=True; CheckpointError naming the path otherwise."""
    return load_hashed(path, map_location=map_location)[0]


def load_hashed(path: str | Path, *, map_location: str = "cpu") -> tuple[dict[str, Any], str]:
    """`load`, and the sha256 of the very bytes loaded."""
    path = Path(path)
    state, raw = _read_weights_only(path, what="gantk checkpoint", missing="checkpoint not found",
                                    map_location=map_location)
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a gantk checkpoint (no '{KIND}' marker)")
    if state.get("format", 0) > FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']} is newer than this gantk ({FORMAT})")
    if not isinstance(state.get("config"), dict) or state["config"].get("arch") not in _archs():
        arch = state["config"].get("arch") if isinstance(state.get("config"), dict) else None
        raise CheckpointError(f"{path}: a checkpoint of architecture {arch!r}, which this gantk does not have "
                              f"({', '.join(_archs())})")
    return state, hashlib.sha256(raw).hexdigest()


def _archs() -> list[str]:
    from .models import ARCHS

    return list(ARCHS)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import torch

    from . import __version__

    return {"gantk": __version__, "torch": str(torch.__version__)}


def newest_run(runs_dir: str | Path = "runs") -> Path:
    """The run folder whose last.pt is newest."""
    runs = sorted(Path(runs_dir).glob("*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UsageError(f"no trained run found under {runs_dir}/ (run `gantk train` first, or pass a path)")
    return runs[-1].parent.parent


def newest_checkpoint(runs_dir: str | Path = "runs") -> Path:
    return newest_run(runs_dir) / "checkpoints" / "last.pt"


def numbered(folder: Path) -> list[Path]:
    """The step-N.pt checkpoints in `folder`, oldest first (a user's step-backup.pt is not one)."""
    return sorted((p for p in folder.glob("step-*.pt") if NUMBERED.fullmatch(p.name)),
                  key=lambda p: (numbered_step(p), p))


def numbered_step(path: Path) -> int:
    """The step of a numbered checkpoint, from its name."""
    return int(NUMBERED.fullmatch(path.name)[1])


def newest_to_resume(runs_dir: str | Path = "runs") -> Path:
    """`--resume auto`: the newest run's last.pt; UsageError where a newer run stopped before its first
    save (it cannot be resumed, and continuing an older run instead would surprise)."""
    last = newest_checkpoint(runs_dir)
    newer = [p.parent for p in Path(runs_dir).glob("*/config.json")
             if not (p.parent / "checkpoints" / "last.pt").exists() and p.stat().st_mtime > last.stat().st_mtime]
    if newer:
        run = max(newer, key=lambda p: (p / "config.json").stat().st_mtime)
        raise UsageError(f"--resume auto: the newest run, {run}, stopped before its first checkpoint and cannot "
                         f"be resumed; give the run to continue (--resume {last.parent.parent}), or move {run} "
                         f"away and train it again")
    return last


def resolve(path: str | Path) -> Path:
    """A checkpoint path from a file or a run folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt" if (p / "checkpoints").is_dir() else p / "last.pt"
        others = [] if p.is_file() or p.parent.name != "checkpoints" else \
            numbered(p.parent)[-3:] + [b for b in [p.parent / "best.pt"] if b.is_file()]
        if others:
            raise CheckpointError(f"{path}: its {p.relative_to(path)} is {'a folder' if p.is_dir() else 'missing'}; "
                                  f"pass one of its checkpoints instead ({', '.join(o.name for o in others)})")
        if not p.is_file():
            raise CheckpointError(f"{path} is a folder without a checkpoint ({p.relative_to(path)}): not a gantk "
                                  f"run, or one that has not saved yet")
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return p


def generator_from(state: dict[str, Any], *, prefer_ema: bool = True):
    """The generator a checkpoint samples with (EMA when it has one), in eval mode on CPU."""
    from .models import build_generator

    g = build_generator(state["config"]["arch"])
    weights = state["ema"] if prefer_ema and state.get("ema") is not None else state["generator"]
    try:
        g.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit arch {state['config']['arch']!r}: "
                              f"{str(e).splitlines()[0]}") from None
    return g.eval().requires_grad_(False)

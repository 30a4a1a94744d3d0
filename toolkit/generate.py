"""Generate digits: noise per index, batched inference overlapped with a pool of PNG writers, a manifest
that makes a re-run a no-op and an interrupted run resumable, and a parity check against eager PyTorch
before anything is written.

Determinism. The noise of image i is `np.random.default_rng([seed, i]).standard_normal(latent_shape)`
(float32): it depends on (seed, i) only, never on the batch it falls in, the range or the shard.
Backends either are batch-size invariant (onnxruntime on the CPU: checked by the tests) or compute in
one fixed shape with padding (torch, CUDA), so the PNG bytes of image i are the same for any
`batch_size`, any `start/count` split and any shard.

Shards. `shard=(k, n)` takes every index i of [start, start + count) with i % n == k (strided, so
every shard gets an equal share of any range). n machines running shards 0..n-1 into one folder each,
one after another into the same folder, or at once into one shared folder (the manifest is updated
under a POSIX lock on `.gantk-lock` there), write exactly the files of the unsharded run.

The output folder holds `<index:06d>.png` (or one `images-<first>-<stop>[-shard<k>of<n>].npy`),
`manifest.json` (identity: model sha256, seed, format; then index, file, sha256 per image) and
`summary.json` (what ran where, how fast, the parity figures); `grid.png` with `grid=True`; and the
empty `.gantk-lock`. Every file appears whole or not at all: written unnamed (O_TMPFILE) and linked
in, or written to a temp file in the folder and moved into place with `os.replace`. PNGs are not
fsynced one by one (5 ms each); instead every run checks each recorded file's sha256, so a file lost
or damaged by a crash, or by anyone, is found and rewritten. Files gantk did not write are never
deleted or overwritten.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import GantkError, Interrupted, UsageError, VerificationError, signals_wait, sigterm_as_interrupt

log = logging.getLogger("gantk")

MANIFEST, SUMMARY, GRID = "manifest.json", "summary.json", "grid.png"
SUMMARY_KIND, GRID_MARK = "gantk-generate-summary", {"Software": "gantk generate contact sheet"}
MANIFEST_KIND = "gantk-generate-manifest"
TMP_PREFIX = ".gantk-tmp-"
NAME_WIDTH = 6
FORMATS = ("png", "npy")
CHUNK = 32             # images per writer task
NOISE_CHUNK = 128      # noise vectors per worker task
NOISE_AHEAD = 2        # batches whose noise is drawn ahead of inference, at least
PROCESS_MIN_IMAGES = 2048  # from this many images on, workers are processes (see `executor`)
MAX_WRITERS = 16
QUEUE_IMAGES = 4096    # PNG work queued beyond the batch being handed over, at most (memory at huge batches)
FLUSH_SECONDS = 2.0    # manifest checkpoint interval during a run
STALE_TEMP_S = 3600.0  # a temp file this old belongs to no write in flight, even with hosts' clocks apart
LOCK = ".gantk-lock"   # in the output folder: runs writing into it at once take turns at the manifest
HOST = "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"  # in temp file names
GRID_COLS, GRID_MAX = 8, 64

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Request:
    """What to generate and where; validated by `check_request` before anything is opened."""

    out: Path
    seed: int = 0
    start: int = 0
    count: int = 10000
    shard: tuple[int, int] = (0, 1)
    batch_size: int = 256
    fmt: str = "png"
    grid: bool = False
    overwrite: bool = False
    parity: bool = True
    parity_samples: int = 64
    atol: float | None = None
    reference: Path | None = None
    writers: int | None = None  # None: default_writers()

    @property
    def stop(self) -> int:
        return self.start + self.count

    def indices(self) -> range:
        k, n = self.shard
        return range(self.start + (k - self.start) % n, self.stop, n)


# ------------------------------------------------------------------------------------------ pieces


def noise(seed: int, indices, latent_shape: tuple[int, ...]) -> np.ndarray:
    """float32 (len(indices), *latent_shape); row j depends only on (seed, indices[j])."""
    out = np.empty((len(indices), *latent_shape), np.float32)
    for j, i in enumerate(indices):
        out[j] = np.random.default_rng([seed, int(i)]).standard_normal(latent_shape, dtype=np.float32)
    return out


def to_pixels(x: np.ndarray) -> np.ndarray:
    """(N,1,32,32) in [-1,1] -> uint8 (N,32,32): round((x + 1) * 127.5) in float64, clipped; NaN -> 0.

    In place on one float64 copy (a float32 x + 1 and its product with 127.5 are exact there)."""
    y = np.array(np.asarray(x)[:, 0], dtype=np.float64)
    y += 1.0
    y *= 127.5
    np.rint(y, out=y)
    np.fmax(y, 0.0, out=y)  # fmax, unlike clip, also maps NaN to 0
    np.fmin(y, 255.0, out=y)
    return y.astype(np.uint8)


def encode_png(px: np.ndarray, *, text: dict[str, str] | None = None) -> bytes:
    """8-bit grayscale PNG of a (H, W) uint8 array, encoded by Pillow with zlib's Z_RLE strategy (runs
    only, made for PNG rows): on 32x32 digits 0.73x the time of the default strategy, files no larger
    (benchmarks/bench_png_writer.py). `text`: tEXt chunks."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(px, "L").save(buf, format="PNG", compress_level=6, compress_type=zlib.Z_RLE, pnginfo=info)
    return buf.getvalue()


def file_name(i: int) -> str:
    return f"{i:0{NAME_WIDTH}d}.png"


def parse_shard(text: str) -> tuple[int, int]:
    """'k/n' -> (k, n) with 0 <= k < n."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like k/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {text}: need 0 <= k < n")
    return k, n


def check_request(req: Request) -> None:
    """Bad input -> UsageError, before anything is opened or written."""
    checks = [(req.count >= 1, f"--count must be at least 1, got {req.count}"),
              (req.start >= 0, f"--start must not be negative, got {req.start}"),
              (req.batch_size >= 1, f"--batch-size must be at least 1, got {req.batch_size}"),
              (req.seed >= 0, f"--seed must not be negative, got {req.seed}"),
              (req.writers is None or req.writers >= 1, f"--writers must be at least 1, got {req.writers}"),
              (req.parity_samples >= 1, f"--parity-samples must be at least 1, got {req.parity_samples}"),
              (req.fmt in FORMATS, f"unknown format {req.fmt!r} (choose from {', '.join(FORMATS)})"),
              (req.atol is None or 0 <= req.atol < float("inf"), f"--atol must be a finite number >= 0, got {req.atol}"),
              (req.parity or req.reference is None, "--reference is the parity check's; drop it or --no-parity")]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    parse_shard(f"{req.shard[0]}/{req.shard[1]}")
    if len(req.indices()) == 0:
        raise UsageError(f"shard {req.shard[0]}/{req.shard[1]} has no index in [{req.start}, {req.stop})")


def check_out(out: Path) -> None:
    """--out must be a folder (or not exist yet) that gantk can write in. An existing folder is asked with
    os.access (a probe file would change its mtime); a new one is probed in its nearest existing parent."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file (give a folder)")
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out {out} is a link to {os.readlink(out)}, which does not exist")
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise GantkError(f"--out {out} is not writable")
        return
    from .checkpoint import existing_ancestor

    probe = existing_ancestor(out.parent)
    if not probe.is_dir():
        raise UsageError(f"--out {out}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + "probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise GantkError(f"--out {out} is not writable ({probe}: {e.strerror or e})") from None


def _write_atomic(path: Path, data: bytes, dir_fd: int | None = None) -> None:
    """Never a partial file under the final name (no fsync). A new file is written unnamed (Linux's
    O_TMPFILE) and linked in whole, one directory update instead of a temp file's create and rename
    (0.8-0.85x the time here); where the file system has no O_TMPFILE or `path` exists, a temp file
    beside `path`, then os.replace.

    `dir_fd`: path's folder from `_open_dir`, for names relative to it: a PNG worker opens the folder
    once per task rather than have its path resolved at every call (42 against 62 core-us a file
    here, BENCHMARKS.md)."""
    if _link_new(path, data, dir_fd):
        return
    tmp = _at(path.with_name(f"{TMP_PREFIX}{path.name}-{HOST}-{os.getpid()}-{threading.get_ident()}"), dir_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, _at(path, dir_fd), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _at(path: Path, dir_fd: int | None) -> str | Path:
    """`path` as an *at() call takes it: its name in the folder `dir_fd`, else the path itself."""
    return path.name if dir_fd is not None else path


def _open_dir(folder: Path) -> int | None:
    """`folder` open for the *at() calls of `_write_atomic`; None where the OS has none (Windows)."""
    if not hasattr(os, "O_DIRECTORY") or os.open not in os.supports_dir_fd:
        return None
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY)


_NO_TMPFILE: set[str] = set()  # folders whose file system refused O_TMPFILE (or /proc is missing)


def _link_new(path: Path, data: bytes, dir_fd: int | None) -> bool:
    """Write `data` to an unnamed file in path's folder (or `dir_fd`) and link it as `path`; False,
    having changed nothing, where that cannot be done (no O_TMPFILE here, or `path` already exists)."""
    folder = str(path.parent)
    if not hasattr(os, "O_TMPFILE") or folder in _NO_TMPFILE:
        return False
    try:
        fd = os.open("." if dir_fd is not None else folder, os.O_TMPFILE | os.O_WRONLY, 0o644, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # no O_TMPFILE on this file system
            _NO_TMPFILE.add(folder)
            return False
        raise
    try:
        _write_all(fd, data)
        # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N, open(2)'s unprivileged way. The source path is
        # absolute, so src_dir_fd is ignored by the kernel; passing one makes os.link call linkat.
        os.link(f"/proc/self/fd/{fd}", _at(path, dir_fd), src_dir_fd=fd, dst_dir_fd=dir_fd, follow_symlinks=True)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EXDEV, errno.EPERM):
            raise
        _NO_TMPFILE.add(folder)
        return False
    finally:
        os.close(fd)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def check_room(req: Request, out: Path, have: int) -> None:
    """A run that cannot fit is refused before it starts: PNGs take a block (of at most 4 KiB: network
    filesystems report their transfer size there) and an inode each, `have` of them may already be there
    or be replaced; an .npy array is built in memory, then written whole. Unknown figures (0) pass."""
    from .checkpoint import existing_ancestor

    n = len(req.indices())
    st = os.statvfs(existing_ancestor(out))
    free = st.f_bavail * st.f_frsize
    if req.fmt == "png":
        n, block = max(n - have, 0), min(st.f_frsize, 4096)
        if st.f_blocks and n * block > free:
            raise UsageError(f"--count {req.count}: {n:,} PNGs need about {_size(n * block)} ({block}-byte "
                             f"blocks); {out}'s filesystem has {_size(free)} free")
        if st.f_files and n > st.f_favail:  # no inode figures: f_files 0
            raise UsageError(f"--count {req.count}: {n:,} PNGs need as many inodes; {out}'s filesystem has "
                             f"{st.f_favail:,} free")
        return
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if 2 * n * 1024 > ram:
        raise UsageError(f"--count {req.count}: an .npy of {n:,} images is built in memory ({_size(2 * n * 1024)} "
                         f"with its copy), more than this machine's {_size(ram)}; split it with --start/--count")
    if st.f_blocks and n * 1024 > free and not have:
        raise UsageError(f"--count {req.count}: an .npy of {n:,} images needs {_size(n * 1024)}; {out}'s "
                         f"filesystem has {_size(free)} free")


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000


# ------------------------------------------------------------------------------------------ the folder


@dataclass
class Folder:
    """The output folder's manifest: who owns it (identity) and what gantk wrote there (sha256 per file)."""

    path: Path
    identity: dict[str, Any]
    files: dict[int, dict[str, str]] = field(default_factory=dict)
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)
    claimed: bool = False       # a manifest of this identity existed when the run started
    replaces: dict[str, Any] | None = None  # the identity --overwrite replaces
    writer: bool = True         # under torchrun only rank 0 writes the manifest
    _next_flush: float = 0.0

    def to_bytes(self) -> bytes:
        rows = [json.dumps({"index": i, **self.files[i]}, sort_keys=True) for i in sorted(self.files)]
        head = json.dumps({"kind": MANIFEST_KIND, "format": 1, "identity": self.identity,
                           "arrays": [self.arrays[k] for k in sorted(self.arrays)]}, sort_keys=True)
        files = "[\n" + ",\n".join(rows) + "\n]" if rows else "[]"
        return (head[:-1] + f', "files": {files}}}\n').encode()

    def flush(self, *, force: bool = True) -> bool:
        """Write manifest.json if its bytes changed; False when nothing needed writing.

        Runs writing into the same folder at once (shards on several machines over a shared filesystem)
        take turns under a lock on the folder, and each first takes in what the others recorded."""
        from .checkpoint import atomic_write_bytes

        if not self.writer or (not force and time.monotonic() < self._next_flush):
            return False
        started = time.monotonic()
        path = self.path / MANIFEST
        with _locked(self.path):
            self._take_in(read_manifest(self.path))
            data = self.to_bytes()
            if path.is_file() and path.read_bytes() == data:
                return False
            atomic_write_bytes(path, data)
            self.replaces = None
        cost = time.monotonic() - started  # a huge manifest is flushed less often, never >10% of the time
        self._next_flush = time.monotonic() + max(FLUSH_SECONDS, 10 * cost)
        return True

    def _take_in(self, doc: dict[str, Any] | None) -> None:
        """Entries another run of this identity recorded on disk since this one read the manifest."""
        if doc is not None and doc["identity"] == self.identity:
            self.replaces = None  # from now on another identity appearing is an error
        if doc is None or doc["identity"] == self.replaces:
            return
        if doc["identity"] != self.identity:
            raise GantkError(f"{self.path}: another gantk generate of a different model/seed/format took this "
                             f"folder while this run wrote into it; its files and manifest are left as they are")
        for row in doc.get("files", []):
            self.files.setdefault(int(row["index"]), {"file": row["file"], "sha256": row["sha256"]})
        for a in doc.get("arrays", []):
            self.arrays.setdefault(a["file"], a)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive POSIX lock (fcntl.lockf, which NFS supports) on the folder's LOCK file. Where locks
    are unavailable, one warning, and the run goes on unlocked: alone in its folder it needs none."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = None
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.lockf(fd, fcntl.LOCK_EX)
    except OSError as e:
        if folder not in _UNLOCKED:
            _UNLOCKED.add(folder)
            log.warning("cannot lock %s (%s): runs writing into this folder at the same time could lose "
                        "manifest entries", folder / LOCK, e.strerror or e)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


_UNLOCKED: set[Path] = set()


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    if not path.is_file():
        raise UsageError(f"{path} exists and is not a gantk generate manifest (not a file); choose another --out")
    text = path.read_bytes().decode(errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("kind") != MANIFEST_KIND:
        damaged = doc is None and MANIFEST_KIND in text
        raise UsageError(f"{path} " + ("is a damaged gantk manifest (not valid JSON): gantk cannot tell its files "
                                       "from yours there; move them away or choose another --out" if damaged else
                                       "exists and is not a gantk generate manifest; choose another --out"))
    return doc


def open_folder(out: Path, identity: dict[str, Any], *, overwrite: bool) -> tuple[Folder, dict | None]:
    """The folder as this run will own it, and the other identity's manifest when --overwrite replaces it."""
    doc = read_manifest(out)
    if doc is None:
        return Folder(out, identity), None
    if doc["identity"] != identity:
        if not overwrite:
            raise UsageError(f"{out} holds output of another model/seed/format ({_differs(doc['identity'], identity)}); "
                             f"use another --out, or --overwrite to replace gantk's files there")
        return Folder(out, identity, claimed=True, replaces=doc["identity"]), doc
    files = {int(r["index"]): {"file": r["file"], "sha256": r["sha256"]} for r in doc.get("files", [])}
    arrays = {a["file"]: a for a in doc.get("arrays", [])}
    return Folder(out, identity, files, arrays, claimed=True), None


def _differs(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {str(old.get(k))[:16]} vs {str(new.get(k))[:16]}" for k in keys)


def plan_pngs(folder: Folder, indices: range, replaced: dict | None = None) -> tuple[list[int], int]:
    """Indices still to write, and how many are already there with their recorded hash.

    A file on disk that no manifest vouches for is refused, unless the folder is this identity's (then
    it may be a killed run's: `adopt_unrecorded` checks it). Under --overwrite only the old identity's
    files whose bytes are still gantk's may go."""
    old = {e["file"]: e["sha256"] for e in (replaced or {}).get("files", [])}
    todo, kept = [], 0
    for i in indices:
        entry = folder.files.get(i)
        path = folder.path / file_name(i)
        if path.is_dir():
            raise UsageError(f"{path} is a folder, where image {i} goes; move it away or choose another --out")
        if entry and entry["file"] == path.name and _sha256_file(path) == entry["sha256"]:
            kept += 1
        elif entry is None and path.exists() and not folder.claimed:
            raise _not_ours(path)
        elif entry is None and path.exists() and replaced is not None and old.get(path.name) != _sha256_file(path):
            raise _not_replaced(path)
        else:
            todo.append(i)
    return todo, kept


def adopt_unrecorded(backend, req: Request, folder: Folder, todo: list[int]) -> tuple[list[int], int]:
    """In a folder of this identity, the files at indices still to write that no manifest lists (a run
    killed between writing them and recording them, or a run writing beside this one). One that holds
    this run's image is recorded as it is; one within the parity tolerance of it (written on another
    device, or by another Pillow) is this run's and is written again; any other file is refused before
    anything is written. Returns the indices left to write and how many were recorded."""
    unrecorded = [i for i in todo if i not in folder.files and (folder.path / file_name(i)).exists()]
    kept = set()
    for lo in range(0, len(unrecorded), req.batch_size):
        idx = unrecorded[lo:lo + req.batch_size]
        for i, px in zip(idx, to_pixels(backend(noise(req.seed, idx, backend.latent_shape)))):
            path, data = folder.path / file_name(i), encode_png(px)
            if _read_or_none(path) == data:
                folder.files[i] = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest()}
                kept.add(i)
            elif not _close(_read_png(path), px, _levels(req, backend.metadata)):
                raise UsageError(f"{path} exists, no manifest lists it and it is not image {i} of this model "
                                 f"and seed; move it away or choose another --out")
    return [i for i in todo if i not in kept], len(kept)


def _levels(req: Request, meta: dict[str, Any]) -> int:
    """uint8 levels two outputs within the parity tolerance of eager may differ by (both pass the check)."""
    atol = req.atol if req.atol is not None else _default_atol(meta)
    return max(1, math.ceil(2 * atol * 127.5))


def _close(pixels: np.ndarray | None, want: np.ndarray, levels: int) -> bool:
    return pixels is not None and pixels.shape == want.shape and \
        int(np.abs(pixels.astype(np.int16) - want).max()) <= levels


def _read_png(path: Path) -> np.ndarray | None:
    """A file's pixels when it is an 8-bit grayscale image, else None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im) if im.mode == "L" else None
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def check_npy(folder: Folder, name: str, replaced: dict | None) -> None:
    """As `plan_pngs` for the run's array: under --overwrite, a file of its name that neither manifest
    lists with its bytes is the user's."""
    path = folder.path / name
    old = {e["file"]: e["sha256"] for e in (replaced or {}).get("arrays", [])}
    if replaced is not None and name not in folder.arrays and path.exists() and old.get(name) != _sha256_file(path):
        raise _not_replaced(path)


def _not_ours(path: Path) -> UsageError:
    return UsageError(f"{path} exists and was not written by gantk; move it away or choose another --out")


def _not_replaced(path: Path) -> UsageError:
    return UsageError(f"{path} exists and the manifest of the output --overwrite replaces does not list it with "
                      f"these bytes (your file, or one a killed run did not record); move it away or choose "
                      f"another --out")


def _refuse_foreign(folder: Folder, names: list[str]) -> None:
    """A folder gantk has not claimed: its own summary/grid/array names must not already be taken. In one
    it has, a summary or grid that is not gantk's (no manifest records them: their content says so)."""
    for name in names:
        path = folder.path / name
        if path.exists() and not (folder.claimed and {SUMMARY: _our_summary, GRID: _our_grid}.get(name, bool)(path)):
            raise _not_ours(path)


def _our_summary(path: Path) -> bool:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    # before its kind was written: the keys every gantk summary has
    return isinstance(doc, dict) and (doc.get("kind") == SUMMARY_KIND or {"model_sha256", "backend", "seed",
                                                                             "images", "parity"} <= doc.keys())


def _our_grid(path: Path) -> bool:
    """Marked as gantk's; or, drawn before the mark, a grayscale sheet of 34-px cells on a 2-px black frame."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode != "L":
                return False
            if {k: im.text.get(k) for k in GRID_MARK} == GRID_MARK:
                return True
            px = np.asarray(im)
    except (OSError, UnidentifiedImageError):
        return False
    h, w = px.shape
    return (h - 2) % 34 == 0 and (w - 2) % 34 == 0 and 0 < w <= GRID_COLS * 34 + 2 and \
        not px[:2].any() and not px[:, :2].any() and not px[::34].any() and not px[:, ::34].any()


def _drop_replaced(out: Path, old: dict | None) -> int:
    """--overwrite: delete the files another identity's manifest lists, where they still hold gantk's bytes."""
    removed = 0
    entries = (old or {}).get("files", []) + (old or {}).get("arrays", [])
    for e in entries:
        path = out / e["file"]
        if _sha256_file(path) == e["sha256"]:
            path.unlink()
            removed += 1
    return removed


def _clean_temps(out: Path) -> None:
    """Remove the temp files of runs that died: this host's whose process is gone, and any older than
    STALE_TEMP_S (another host's, whose processes cannot be seen from here, or a recycled pid's)."""
    now = time.time()
    for p in out.glob(TMP_PREFIX + "*"):
        host, pid = _temp_owner(p.name)
        with contextlib.suppress(FileNotFoundError):
            if (host == HOST and not _alive(pid)) or now - p.stat().st_mtime > STALE_TEMP_S:
                p.unlink()


def _temp_owner(name: str) -> tuple[str | None, int | None]:
    """(host, pid) from `_write_atomic`'s temp name, <prefix><file>-<host>-<pid>-<thread>; else Nones."""
    parts = name.rsplit("-", 3)
    if len(parts) == 4 and parts[2].isdigit():
        return parts[1], int(parts[2])
    return None, None


def _alive(pid: int | None) -> bool:
    """A running process other than this one (which has no writes in flight yet); zombies are dead."""
    if pid is None or pid == os.getpid():
        return False
    if Path("/proc/self/stat").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------ parity


def parity_indices(req: Request) -> list[int]:
    """Up to `parity_samples` indices spread evenly over the requested range (this shard's indices)."""
    idx = req.indices()
    picks = np.linspace(0, len(idx) - 1, min(req.parity_samples, len(idx))).round().astype(int)
    return sorted({idx[p] for p in picks})


def find_reference(meta: dict[str, Any], model: Path, reference: Path | None) -> tuple[Path | None, str]:
    """The checkpoint to compare with, and a note; (None, why) when there is none to trust."""
    from .checkpoint import resolve, sha256

    want = meta.get("source_sha256", "")
    if reference is not None:
        path = resolve(reference)
        got = sha256(path)
        if want and got != want:
            raise UsageError(f"--reference {path}: sha256 {got[:12]}... is not the model's source "
                             f"checkpoint ({want[:12]}...)")
        return path, f"--reference {path}" + ("" if want else " (the model records no source sha256)")
    src = meta.get("source_checkpoint", "")
    if not src:
        return None, f"{model} names no source checkpoint in its metadata"
    path = Path(src) if Path(src).is_absolute() else model.parent / src
    if not want or (path.is_file() and sha256(path) == want):
        if not path.is_file():
            return None, f"the source checkpoint named in {model.name}'s metadata is not there: {src}"
        return path, f"source checkpoint {path}" + (" (sha256 matches the metadata)" if want else "")
    same = _same_checkpoint(path, meta.get("step", ""), want)
    if same is not None:  # training went on and last.pt moved: a numbered copy of the source remains
        return same, f"{same} (the source's sha256; {src} has changed since the export)"
    if not path.is_file():
        return None, f"the source checkpoint named in {model.name}'s metadata is not there: {src}"
    return None, f"the source checkpoint {src} changed since the export (sha256 differs), and no checkpoint beside it matches"


def _same_checkpoint(path: Path, step: str, want: str) -> Path | None:
    """A checkpoint in `path`'s folder with sha256 `want`: the numbered one of `step` first."""
    from .checkpoint import sha256

    if not path.parent.is_dir():
        return None
    numbered = path.parent / f"step-{int(step):08d}.pt" if step.isdigit() else None
    others = sorted(p for p in path.parent.glob("*.pt") if p not in (path, numbered))
    return next((p for p in [numbered, *others] if p is not None and p.is_file() and sha256(p) == want), None)


def eager_reference(path: Path, want: str = "") -> Callable[[np.ndarray], np.ndarray] | None:
    """The checkpoint's sampling generator, eager, float32 on the CPU; None where its bytes are no longer
    of sha256 `want` (training replaced last.pt after find_reference picked it)."""
    import torch

    from .checkpoint import generator_from, load_hashed

    state, got = load_hashed(path)
    if want and got != want:
        return None
    g = generator_from(state)

    def run(z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return g(torch.from_numpy(z)).numpy()

    return run


def parity_check(backend, req: Request) -> dict[str, Any]:
    """Compare the backend with eager PyTorch on a spread of this run's indices; VerificationError beyond atol."""
    from .exporters.validate import figures as compare

    if backend.name == "torch":
        return {"status": "not-applicable", "reason": "the torch backend is the eager reference itself"}
    if not req.parity:
        return {"status": "skipped", "reason": "--no-parity"}
    for _ in range(2):  # a second look where training replaced the picked last.pt before it was read
        ref, note = find_reference(backend.metadata, backend.path, req.reference)
        if ref is None:
            raise UsageError(f"no parity reference: {note}; pass --reference CHECKPOINT, or --no-parity to "
                             f"generate without the check")
        if (reference := eager_reference(ref, backend.metadata.get("source_sha256", ""))) is not None:
            break
    else:
        raise UsageError(f"no parity reference: {ref} changed while it was read, twice; pass --reference CHECKPOINT")
    idx = parity_indices(req)
    z = noise(req.seed, idx, backend.latent_shape)
    figures = compare(backend(z), reference(z))
    atol = req.atol if req.atol is not None else _default_atol(backend.metadata)
    result = {"status": "passed", "reference": str(ref), "note": note, "samples": len(idx), "atol": atol, **figures}
    if figures["max_abs_diff"] > atol:
        raise VerificationError(f"parity failed against {ref}: max abs diff {figures['max_abs_diff']:.3g} > atol "
                                f"{atol:.3g}, mean {figures['mean_abs_diff']:.3g}, {figures['pixels_off']:.2%} "
                                f"of uint8 pixels differ ({len(idx)} samples); nothing written")
    return result


def _default_atol(meta: dict[str, Any]) -> float:
    from .exporters.validate import TOLERANCE

    return TOLERANCE.get(meta.get("dtype", "fp32"), TOLERANCE["fp32"])


# ------------------------------------------------------------------------------------------ the pipeline


class Timing(collections.Counter):
    """Seconds per stage of a run, for the summary's `timing` (where the time went); `cpu`: the CPU
    seconds of the whole timed phase, `workers_cpu` the workers' share of them (noise and PNGs)."""

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[stage] += time.perf_counter() - t0

    def report(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in sorted(self.items())}


def executor(workers: int, images: int) -> Executor:
    """The pool for a run's CPU side (noise, quantisation, PNG encoding and writing): processes for runs of
    at least PROCESS_MIN_IMAGES, where Python threads would serialise on the GIL (seen on a 16-core GPU
    host: 15 writer threads were slower than 2), threads for smaller runs, where starting processes
    costs more than it saves.

    Processes are forked (as torch's DataLoader does on Linux: no re-import of the caller's main
    module) and all started here, before the backend brings its own threads; they ignore Ctrl-C, so the
    main process can stop them after recording what they finished."""
    threads = lambda: ThreadPoolExecutor(workers, thread_name_prefix="gantk-worker")  # noqa: E731
    if images < PROCESS_MIN_IMAGES or not sys.platform.startswith("linux") or multiprocessing.current_process().daemon:
        return threads()  # a daemonic process (a DataLoader worker, say) may not have children
    try:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_worker_init, initargs=(os.getpid(),))
        pool.submit(int).result()  # forks every worker now
    except (OSError, ImportError, BrokenExecutor) as e:
        log.warning("worker processes did not start (%s); using threads", e)
        return threads()
    return pool


def _worker_init(parent: int) -> None:
    """Out of the job's process group and deaf to Ctrl-C: a signal to the group (a terminal's Ctrl-C, a
    scheduler's SIGTERM) reaches the main process alone, which stops the pool after recording what the
    workers finished (the pool's own SIGTERM, sent to a worker itself, still ends it); and die with the
    main process, so a killed run leaves no worker writing behind the re-run that resumes it (Linux:
    PR_SET_PDEATHSIG)."""
    import ctypes

    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # forked inside the main process's SIGTERM handler
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the main process died before prctl took effect
        os._exit(1)


def default_writers(inference_threads: int) -> int:
    """Workers for noise and PNGs: the cores this process may use (its share under torchrun) less the
    inference threads (all streams'), at least 2 and at most MAX_WRITERS.

    Measured with onnxruntime CUDA on a 16-core H200 host (benchmarks/gpu_checks.sh e2e, 100,000 PNGs,
    2026-11-29): 2 / 8 / 15 workers 7,896 / 18,056 / 21,278 img/s. On the 2-core CPU machine: 2."""
    from .backends import cores

    return min(MAX_WRITERS, max(2, cores() - inference_threads))


def _noise_chunk(seed: int, indices: list[int], latent_shape: tuple[int, ...]) -> tuple[np.ndarray, float, float]:
    """The noise, the seconds it took and the CPU seconds of this worker's thread."""
    t0, c0 = time.perf_counter(), time.thread_time()
    z = noise(seed, indices, latent_shape)
    return z, time.perf_counter() - t0, time.thread_time() - c0


def infer_batches(backend, seed: int, todo: list[int], batch_size: int, pool: Executor, timing: Timing,
                  *, backlog: int = 0) -> Iterator[tuple[list[int], np.ndarray]]:
    """(indices, float32 images) per batch; the noise of the next batches is drawn by `pool` while this
    one runs: NOISE_AHEAD batches, or more when the caller keeps up to `backlog` images of other work
    queued in the same pool, so that a batch's noise never waits behind that queue (seen on the GPU
    host with 15 workers before: 2.2 of 4.7 s spent waiting for noise).

    `timing` gets the noise workers' busy time (noise) and CPU time (workers_cpu) and, on this thread, the
    wait for noise (noise_wait) and the backend call (inference)."""
    batches = [todo[lo:lo + batch_size] for lo in range(0, len(todo), batch_size)]
    depth = max(NOISE_AHEAD, -(-backlog // batch_size) + 1)
    ahead: collections.deque = collections.deque()

    def draw(idx: list[int]) -> None:
        ahead.append([pool.submit(_noise_chunk, seed, idx[lo:lo + NOISE_CHUNK], backend.latent_shape)
                      for lo in range(0, len(idx), NOISE_CHUNK)])

    for idx in batches[:depth]:
        draw(idx)
    for b, idx in enumerate(batches):
        with timing("noise_wait"):
            parts = [f.result() for f in ahead.popleft()]
        timing["noise"] += sum(sec for _, sec, _ in parts)
        timing["workers_cpu"] += sum(cpu for _, _, cpu in parts)
        if b + depth < len(batches):
            draw(batches[b + depth])
        with timing("inference"):
            x = backend(np.concatenate([z for z, _, _ in parts]))
        yield idx, x


def _write_chunk(out: Path, indices: list[int], px: np.ndarray,
                 existing: set[int]) -> tuple[list[tuple], float, float]:
    """Encode and write PNGs of uint8 pixels; a file already holding exactly these bytes is left
    untouched. Returns (index, name, sha256, wrote) per image, the seconds it took and the CPU seconds
    of this worker's thread."""
    t0, c0, done = time.perf_counter(), time.thread_time(), []
    dir_fd = _open_dir(out)
    try:
        for i, p in zip(indices, px):
            data, name = encode_png(p), file_name(i)
            wrote = i not in existing or _read_or_none(out / name) != data
            if wrote:
                _write_atomic(out / name, data, dir_fd)
            done.append((i, name, hashlib.sha256(data).hexdigest(), wrote))
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return done, time.perf_counter() - t0, time.thread_time() - c0


def write_pngs(backend, req: Request, folder: Folder, todo: list[int], pool: Executor, progress: Progress,
               timing: Timing) -> dict[str, int]:
    """Inference in this thread; noise, quantisation, encoding and writing in `req.writers` workers; the
    manifest kept current.

    `timing`: besides infer_batches' stages, the writers' summed busy time (png_writers, over all
    workers) and CPU time (added to workers_cpu), this thread's wait for them (png_wait) and the manifest
    checkpoints (manifest)."""
    stats = {"written": 0, "unchanged": 0}
    existing = {i for i in todo if (folder.path / file_name(i)).exists()}  # left by a crash, or damaged
    pending: collections.deque = collections.deque()

    # PNG tasks kept in flight: two batches' worth (up to QUEUE_IMAGES), or one writer (--writers 1)
    # would hold up inference after every batch (measured: 1,900 against 2,350 img/s on 2 cores, batch 256)
    queued = max(4 * req.writers, -(-min(2 * req.batch_size, QUEUE_IMAGES) // CHUNK))

    def settle(block: bool) -> None:
        while pending and (block or pending[0].done() or len(pending) > queued):
            with timing("png_wait"):
                done, busy, cpu = pending[0].result()
            for i, name, sha, wrote in done:
                folder.files[i] = {"file": name, "sha256": sha}
                stats["written" if wrote else "unchanged"] += 1
            pending.popleft()  # only now: an interrupt before this line leaves the chunk to be recorded
            timing["png_writers"] += busy
            timing["workers_cpu"] += cpu
            progress({"event": "written", "n": len(done)})

    try:
        for idx, x in infer_batches(backend, req.seed, todo, req.batch_size, pool, timing,
                                    backlog=(queued + 1) * CHUNK + req.batch_size):
            with timing("pixels"):  # here: a quarter of the bytes to send to the writers
                px = to_pixels(x)
            for lo in range(0, len(idx), CHUNK):
                chunk = idx[lo:lo + CHUNK]
                pending.append(pool.submit(_write_chunk, folder.path, chunk, px[lo:lo + CHUNK],
                                           existing.intersection(chunk)))
            settle(False)
            with timing("manifest"):
                folder.flush(force=False)
        settle(True)
    except BaseException:
        with signals_wait():
            _settle_after_failure(pending, folder, pool, [i for i in todo if i not in existing])
        raise
    return stats


def _settle_after_failure(pending: collections.deque, folder: Folder, pool: Executor, fresh: list[int]) -> None:
    """Interrupted: record what the writers finished, so the manifest never lags behind the disk. Under
    torchrun every rank records its own (the flush takes in the others' under the folder's lock).

    `fresh`: the indices this run writes whose files were not there before it. One there now is this
    run's, even when a signal landed between a chunk's submit and its entry in `pending`."""
    pool.shutdown(wait=True, cancel_futures=True)
    for fut in pending:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            for i, name, sha, _ in fut.result()[0]:
                folder.files[i] = {"file": name, "sha256": sha}
    for i in fresh:
        data = None if i in folder.files else _read_or_none(folder.path / file_name(i))
        if data is not None:
            folder.files[i] = {"file": file_name(i), "sha256": hashlib.sha256(data).hexdigest()}
    folder.writer = True
    folder.flush()


def _read_npy(path: Path) -> np.ndarray | None:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return a if isinstance(a, np.ndarray) and a.dtype == np.uint8 else None


def npy_name(req: Request) -> str:
    first = req.indices()[0]
    name = f"images-{first:0{NAME_WIDTH}d}-{req.stop:0{NAME_WIDTH}d}"
    return name + (f"-shard{req.shard[0]}of{req.shard[1]}.npy" if req.shard[1] > 1 else ".npy")


def write_npy(backend, req: Request, folder: Folder, pool: Executor, progress: Progress,
              timing: Timing) -> dict[str, Any]:
    """One uint8 (N, 32, 32) array for this run's indices; rewritten only when its bytes would differ."""
    idx, name = list(req.indices()), npy_name(req)
    path, entry = folder.path / name, folder.arrays.get(name)
    if entry and _sha256_file(path) == entry["sha256"]:
        return {"written": 0, "unchanged": len(idx), "generated": 0, "file": name}
    arr = np.empty((len(idx), 32, 32), np.uint8)
    pos = 0
    for batch, x in infer_batches(backend, req.seed, idx, req.batch_size, pool, timing):
        with timing("pixels"):
            arr[pos:pos + len(batch)] = to_pixels(x)
        pos += len(batch)
        progress({"event": "written", "n": len(batch)})
    with timing("npy_write"):
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        data = buf.getbuffer()  # no third copy of the images
        wrote = not (path.is_file() and path.read_bytes() == data)
        if wrote and entry is None and path.exists():  # in no manifest: ours if within parity of this array
            if not _close(_read_npy(path), arr, _levels(req, backend.metadata)):
                raise UsageError(f"{path} exists, no manifest lists it and it is not this run's array; move it "
                                 f"away or choose another --out")
        if wrote:
            _write_atomic(path, data)
    folder.arrays[name] = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "first": idx[0],
                           "stop": req.stop, "step": req.shard[1], "count": len(idx)}
    return {"written": len(idx) if wrote else 0, "unchanged": 0 if wrote else len(idx), "generated": len(idx),
            "file": name}


def write_grid(req: Request, folder: Folder, *, array: str | None = None) -> str:
    """A contact sheet of the first images of this run's range (from the files on disk)."""
    from PIL import Image

    idx = list(req.indices())[:GRID_MAX]
    if array is not None:
        tiles = np.load(folder.path / array)[:len(idx)]
    else:
        tiles = np.stack([np.asarray(Image.open(folder.path / file_name(i))) for i in idx])
    rows = -(-len(tiles) // GRID_COLS)
    sheet = np.zeros((rows * 34 + 2, min(len(tiles), GRID_COLS) * 34 + 2), np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, GRID_COLS)
        sheet[2 + r * 34:2 + r * 34 + 32, 2 + c * 34:2 + c * 34 + 32] = t
    data, path = encode_png(sheet, text=GRID_MARK), folder.path / GRID
    if not (path.is_file() and path.read_bytes() == data):
        _write_atomic(path, data)
    return str(path)


# ------------------------------------------------------------------------------------------ the command


def generate(req: Request, *, model: Path, backend: str = "onnxruntime", provider: str = "auto",
             threads: int | None = None, streams: int | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Validate, open the backend, check parity, then write what is missing; returns the summary.

    Under torchrun rank r of n takes shard r/n of the range; all ranks write into one folder and
    rank 0 writes the one manifest and summary at the end (Gloo carries only the file lists)."""
    from . import distributed

    world = distributed.from_env()
    if backend == "torch" and req.reference is not None:
        raise UsageError("--reference is what an export is checked against; --backend torch runs the checkpoint "
                         "itself, so drop --reference")
    if world.active:
        if req.shard != (0, 1):
            raise UsageError("under torchrun every rank takes its own shard (rank/world size); drop --shard")
        if req.grid and req.fmt == "npy":
            raise UsageError("--grid with --format npy under torchrun: each rank's array holds every n-th "
                             "image; draw the grid from a single-process run")
        req = dataclasses.replace(req, shard=(world.rank, world.size))
        empty = [r for r in range(world.size) if req.count >= 1 and req.start >= 0 and
                 not len(dataclasses.replace(req, shard=(r, world.size)).indices())]
        if empty:  # every rank says so, rather than one rank failing and the others losing their peer
            raise UsageError(f"--count {req.count} from --start {req.start} leaves rank {empty[0]} of {world.size} "
                             f"no image; generate it in one process, or ask for at least {world.size}")
    created = distributed.init(world, "cpu")
    try:
        with sigterm_as_interrupt():
            return _generate(req, model, backend, provider, (threads, streams), progress or (lambda ev: None), world)
    except KeyboardInterrupt as e:  # before the first image (`_write` handles the rest)
        if isinstance(e.__context__, Interrupted):  # a further signal while `_write`'s report was on its way
            raise e.__context__ from None
        raise Interrupted("interrupted before any image was written", getattr(e, "signum", signal.SIGINT)) from None
    finally:
        distributed.shutdown(created)


def _generate(req, model, backend, provider, asked, progress, world) -> dict[str, Any]:
    from .backends import cores, cpu_plan

    check_request(req)
    check_out(Path(req.out))
    # the workers leave inference the cores it takes for PNGs, even for npy, whose extra CPU streams are
    # idle when a GPU runs (the provider is known only once the backend is open, after the fork)
    threads, streams = cpu_plan(backend, *asked, fmt="png")
    if req.writers and req.writers > max(cores(), default_writers(threads * streams)):
        log.warning("--writers %d on %d cores: more workers than cores only adds switching between them "
                    "(the default here is %d)", req.writers, cores(), default_writers(threads * streams))
    req = dataclasses.replace(req, writers=req.writers or default_writers(threads * streams))
    with executor(req.writers, len(req.indices())) as pool:  # before the backend: see `executor`
        try:
            return _open_and_write(req, model, backend, provider, asked, progress, world, pool)
        except BaseException:
            with signals_wait():
                pool.shutdown(wait=True, cancel_futures=True)  # drop noise drawn ahead; finish what runs
            raise


def _open_and_write(req, model, backend, provider, asked, progress, world, pool) -> dict[str, Any]:
    from .backends import GPU_BATCH, open_backend
    from .checkpoint import sha256

    out = Path(req.out)
    be = open_backend(backend, model, provider=provider, batch_size=GPU_BATCH, threads=asked[0],
                      streams=asked[1], fmt=req.fmt)
    identity = {"model_sha256": be.sha256 or sha256(be.path), "seed": req.seed, "format": req.fmt,
                "latent_shape": list(be.latent_shape)}
    folder, replaced = open_folder(out, identity, overwrite=req.overwrite)
    folder.writer = world.main
    recorded = npy_name(req) in folder.arrays if req.fmt == "npy" else len(folder.files)
    check_room(req, out, recorded + len((replaced or {}).get("files", [])))
    if out.is_dir():
        _refuse_foreign(folder, [SUMMARY, *([GRID] if req.grid else []), npy_name(req)])
    todo, kept = plan_pngs(folder, req.indices(), replaced) if req.fmt == "png" and out.is_dir() \
        else (list(req.indices()), 0)
    if req.fmt == "npy" and out.is_dir():
        check_npy(folder, npy_name(req), replaced)
    parity = parity_check(be, req)
    if req.fmt == "png" and folder.claimed and replaced is None:
        todo, adopted = adopt_unrecorded(be, req, folder, todo)
        kept += adopted
    return _write(be, req, folder, replaced, todo, kept, parity, progress, world, pool)


def _write(be, req, folder, replaced, todo, kept, parity, progress, world, pool) -> dict[str, Any]:
    from . import distributed

    out = folder.path
    distributed.barrier(world)  # every rank has planned before rank 0 touches the folder
    removed, changed = 0, False
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        _clean_temps(out)
        removed = _drop_replaced(out, replaced)
        if replaced is not None and not req.grid and (out / GRID).is_file() and _our_grid(out / GRID):
            log.warning("%s is the replaced output's contact sheet, left as it is (no manifest records it); "
                        "--grid draws this output's", out / GRID)
        changed = folder.flush()  # claim the folder before the first image
    distributed.barrier(world)
    progress({"event": "start", "total": len(req.indices()), "done": kept})
    t0, cpu0, timing = time.perf_counter(), time.process_time(), Timing()
    try:
        if req.fmt == "png":
            stats = write_pngs(be, req, folder, todo, pool, progress, timing) if todo else {"written": 0, "unchanged": 0}
            stats["generated"] = len(todo)
        else:
            stats = write_npy(be, req, folder, pool, progress, timing)
        seconds = time.perf_counter() - t0
        # CPU seconds of the timed phase, this process's threads and the worker processes' together
        timing["cpu"] = time.process_time() - cpu0 + (timing["workers_cpu"] if isinstance(pool, ProcessPoolExecutor) else 0)
        stats["timing"] = timing.report()  # under torchrun the summary keeps rank 0's
        if world.active:
            stats, kept, parity, seconds = _merge_ranks(world, folder, stats, kept, parity, seconds)
            if not world.main:
                return {"rank": world.rank, **stats}
            req = dataclasses.replace(req, shard=(0, 1))
        changed = folder.flush() or changed or stats["written"] > 0 or removed > 0
        progress({"event": "end"})
        summary = _summary(be, req, folder, parity, stats, kept, stats["generated"], seconds, removed)
        if req.grid:
            summary["grid"] = write_grid(req, folder, array=stats.get("file"))
        write = changed or not (out / SUMMARY).is_file()
        if write:
            from .checkpoint import atomic_write_bytes

            atomic_write_bytes(out / SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode() + b"\n")
    except KeyboardInterrupt as e:  # the writers' finished files are in the manifest (write_pngs saw to it)
        with signals_wait():
            folder.writer = True
            folder.flush()  # a stop after writing: the last images too
            done = sum(i in folder.files for i in req.indices()) if req.fmt == "png" else 0
            whose = f" of rank {world.rank}'s shard" if world.active else ""
            stop = Interrupted(f"interrupted: {done} of {len(req.indices())} images{whose} are in {out}; the "
                               f"same command writes the rest", getattr(e, "signum", signal.SIGINT))
        raise stop from None
    return {**summary, "summary_written": write}


def _merge_ranks(world, folder: Folder, stats: dict, kept: int, parity: dict, seconds: float):
    """Every rank's manifest entries and counts, gathered into rank 0's folder and summary."""
    from . import distributed

    parts = distributed.gather(world, (folder.files, folder.arrays, stats, kept, parity, seconds))
    for files, arrays, *_ in parts:
        folder.files.update(files)
        folder.arrays.update(arrays)
    total = {k: sum(p[2].get(k, 0) for p in parts) for k in ("written", "unchanged", "generated")}
    checked = [p[4] for p in parts]
    worst = max(checked, key=lambda c: c.get("max_abs_diff", -1.0))
    merged_parity = {**worst, "ranks": len(parts), "samples": sum(c.get("samples", 0) for c in checked)}
    return {**parts[0][2], **total}, sum(p[3] for p in parts), merged_parity, max(p[5] for p in parts)


def _summary(be, req, folder, parity, stats, kept, generated, seconds, removed) -> dict[str, Any]:
    from . import __version__

    return {
        "kind": SUMMARY_KIND, "out": str(req.out), "model": str(be.path), "model_sha256": folder.identity["model_sha256"], "backend": be.name,
        "provider": be.provider, "settings": be.settings, "seed": req.seed, "start": req.start,
        "count": req.count, "shard": f"{req.shard[0]}/{req.shard[1]}", "images": len(req.indices()),
        "format": req.fmt, "batch_size": req.batch_size, "writers": req.writers,
        "generated": generated, "written": stats["written"], "unchanged": stats["unchanged"] + kept,
        "removed_other_identity": removed, "seconds": round(seconds, 3),
        "images_per_s": round(generated / seconds, 1) if generated and seconds > 0 else None,
        "timing": stats.get("timing", {}), "parity": parity, "warnings": be.warnings, "versions": {"gantk": __version__, **_versions()},
    }


def _versions() -> dict[str, str]:
    import PIL

    out = {"numpy": np.__version__, "pillow": PIL.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


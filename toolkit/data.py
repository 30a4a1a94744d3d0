"""Data sources behind one spec: `mnist`, `synthetic`, or a path (IDX, image folder, .npy/.npz).

Every source loads fully into memory as a `Digits` set: uint8 images (N, 32, 32) and labels (or
None). `to_tensor` scales them to float32 (N, 1, 32, 32) in [-1, 1] for the models.
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

log = logging.getLogger("gantk")
NAMED = ("mnist", "synthetic")  # the data specs that are no path
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SIDE = 32


@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # (N, 32, 32) uint8
    labels: np.ndarray | None  # (N,) int64
    source: str

    def __len__(self) -> int:
        return len(self.images)


def default_cache() -> Path:
    return Path(os.environ.get("GANTK_CACHE", Path.home() / ".cache" / "gantk"))


def load(spec: str, *, seed: int = 0, count: int | None = None, flag: str = "--data") -> Digits:
    """Load `spec`: 'mnist', 'synthetic', or a path. `count` caps the images (synthetic: how many); `flag`
    is the option that named `spec`, for messages."""
    if count is not None and count < 1:
        raise DataError(f"count must be at least 1, got {count}")
    if spec == "mnist":
        digits = load_mnist(flag=flag)
    elif spec == "synthetic":
        check_memory(count or 10_000, 6 * 1024, "synthetic digits")  # uint8, then float32 for training
        digits = synthetic(count or 10_000, seed=seed)
    else:
        digits = load_path(Path(spec))
    if count is not None and len(digits) > count:
        labels = None if digits.labels is None else digits.labels[:count]
        if labels is not None:
            _check_classes(spec, count, labels, digits.labels)
        digits = Digits(digits.images[:count], labels, digits.source)
    return digits


def check_memory(n: int, per_image: int, what: str) -> None:
    """DataError, before any work, where `n` images of `per_image` bytes each cannot fit in this machine's memory."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if n * per_image > ram:
        raise DataError(f"{n:,} {what} need about {n * per_image / 1e9:,.1f} GB in memory, more than this "
                        f"machine's {ram / 1e9:,.1f} GB")


def _check_classes(spec: str, count: int, kept: np.ndarray, whole: np.ndarray) -> None:
    """A warning where the first `count` images miss classes that a random draw of as many would hold
    (Markov: a random draw misses that many with probability under 5%): a file or folder sorted by class."""
    _, sizes = np.unique(whole, return_counts=True)
    missing = len(sizes) - len(np.unique(kept))
    expected = float(np.sum((1.0 - sizes / len(whole)) ** count))  # classes a random draw would miss
    if missing and expected / missing < 0.05:
        log.warning("%s: its first %d images (a count takes them in file order) hold %d of its %d classes",
                    spec, count, len(np.unique(kept)), len(sizes))


def to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).float().div_(127.5).sub_(1.0).unsqueeze(1)


# ---------------------------------------------------------------- torchvision MNIST


def load_mnist(root: Path | None = None, *, flag: str = "--data") -> Digits:
    from torchvision.datasets import MNIST

    from .checkpoint import missing_folders, remove_empty

    root = root or default_cache() / "mnist"
    made = missing_folders(root / "MNIST" / "raw")  # what torchvision makes before it downloads
    try:
        ds = MNIST(str(root), train=True, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError offline
        remove_empty(made)
        raise DataError(
            f"MNIST is not cached in {root} and could not be downloaded ({type(e).__name__}); "
            f"use {flag} synthetic, or {flag} PATH to an IDX file (e.g. t10k-images-idx3-ubyte.gz), "
            "an image folder or a .npy/.npz"
        ) from None
    return Digits(_resize(ds.data.numpy()), ds.targets.numpy().astype(np.int64), "mnist")


# ---------------------------------------------------------------- paths


def load_path(path: Path) -> Digits:
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_dir():
        return _load_folder(path)
    name = path.name.lower()
    if name.endswith((".npy", ".npz")):
        return _load_numpy(path)
    if "idx" in name or name.endswith((".ubyte", ".ubyte.gz")):
        images = read_idx(path)
        if images.ndim != 3:
            raise DataError(f"{path}: IDX holds {images.ndim}-d data, expected images (N, H, W)")
        return Digits(_resize(images), _idx_labels(path, len(images)), str(path))
    raise DataError(f"{path}: unknown data format (expected an IDX file, an image folder, .npy or .npz)")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) as MNIST ships it; raise DataError naming the path if malformed."""
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape))
    if size == 0:
        raise DataError(f"{path}: the IDX header declares shape {shape}, which holds no data")
    if len(raw) - header != size:
        why = "cut short" if len(raw) - header < size else "not the shape it declares"
        raise DataError(f"{path}: IDX data is {len(raw) - header} bytes, its header's shape {shape} holds {size} "
                        f"({why})")
    return np.frombuffer(raw, np.uint8, size, header).reshape(shape).copy()


def _idx_labels(images_path: Path, n: int) -> np.ndarray | None:
    """The labels file beside an images file, if any: `t10k-images-idx3-ubyte[.gz]` ->
    `t10k-labels-idx1-ubyte[.gz]` (also with a dot before idx, as some copies name them)."""
    stem = images_path.name.removesuffix(".gz")
    name = stem.replace("images", "labels").replace("idx3", "idx1")
    found = [p for p in (images_path.with_name(name), images_path.with_name(name + ".gz")) if p.is_file()]
    if name == stem or not found:
        return None
    labels = read_idx(found[0])
    if labels.shape != (n,):
        raise DataError(f"{found[0]}: {labels.shape[0]} labels for {n} images")
    return labels.astype(np.int64)


def _load_numpy(path: Path) -> Digits:
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        if head != b"\x93NUMPY" and not head.startswith(b"PK\x03\x04"):
            raise DataError(f"{path}: not a NumPy .npy or .npz file (no NumPy or zip header)")
        obj = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    labels = None
    if isinstance(obj, np.lib.npyio.NpzFile):
        keys = list(obj.keys())
        key = next((k for k in ("images", "x", "x_test", "x_train", "arr_0") if k in keys), None)
        if key is None:
            raise DataError(f"{path}: no 'images' (or 'x', 'arr_0') array among {keys}")
        images = obj[key]
        lkey = next((k for k in ("labels", "y", "y_test", "y_train") if k in keys), None)
        labels = None if lkey is None else obj[lkey]
        if labels is not None and labels.dtype.kind not in "biuf":
            raise DataError(f"{path}: labels must be whole numbers (digit classes), got {labels.dtype}")
        if labels is not None and not (np.issubdtype(labels.dtype, np.integer) or np.array_equal(labels, np.round(labels))):
            raise DataError(f"{path}: labels must be whole numbers (digit classes), got {labels.dtype} "
                            f"such as {labels.ravel()[0]}")
        labels = None if labels is None else labels.astype(np.int64)
    else:
        images = obj
    images = _as_uint8(images, path)
    if labels is not None and labels.shape != (len(images),):
        raise DataError(f"{path}: {labels.shape} labels for {len(images)} images")
    return Digits(_resize(images), labels, str(path))


def _as_uint8(a: np.ndarray, path: Path) -> np.ndarray:
    """(N, H, W) pixel levels from an image array: uint8 as they are, other numbers by their range."""
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3 or 0 in a.shape:
        raise DataError(f"{path}: expected images of shape (N, H, W) or (N, 1, H, W), got {a.shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:  # 16-bit levels, as a 16-bit image's
        return np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    if a.dtype.kind not in "biuf":
        raise DataError(f"{path}: images of dtype {a.dtype}; expected numbers (uint8, or float pixels)")
    return _levels(a.astype(np.float64), path)  # float64: [-1, 1] rounds as generate's to_pixels does


def _levels(a: np.ndarray, path: Path) -> np.ndarray:
    """uint8 levels of float pixels in [0, 1], [-1, 1] or [0, 255], told apart by the range's ends.

    The ends may overshoot (resampling, noise); the overshoot is clipped. [-1, 1] needs a dark end below
    -0.5 (a digit's background is -1), [0, 255] a bright end of 16 or more; what fits none (normalised
    data such as (x - 0.1307) / 0.3081 or x - 0.5) is refused rather than guessed.
    """
    if not np.isfinite(a).all():
        raise DataError(f"{path}: images contain NaN or inf")
    lo, hi = float(a.min()), float(a.max())
    if -0.35 <= lo and hi <= 1.3:  # [0, 1]
        a = a * 255.0
    elif -1.3 <= lo < -0.5 and hi <= 1.3:  # [-1, 1]
        a = (a + 1.0) * 127.5
    elif not (-32 <= lo and 16 <= hi <= 287):  # [0, 255] within an eighth of its span
        raise DataError(f"{path}: pixel values from {lo:.9g} to {hi:.9g}; expected [0, 1], [-1, 1] or [0, 255] "
                        "(undo any normalisation first)")
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _load_folder(path: Path) -> Digits:
    from PIL import Image, UnidentifiedImageError

    files, arrays = _generated(path)
    if arrays and not files:
        return _generated_arrays(path, arrays)
    files = files or sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    images, floats, labels = [], {}, []
    for k, f in enumerate(files):
        try:
            with Image.open(f) as im:
                if im.mode == "F":  # float pixels: read by the range of the folder's float images (below)
                    floats[k] = np.asarray(im, np.float64)
                images.append(None if im.mode == "F" else _gray(im))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{f}: not a readable image ({e})") from None
        labels.append(int(f.parent.name) if f.parent != path and f.parent.name.isdigit() else -1)
    if floats:
        levels = _levels(np.concatenate([a.ravel() for a in floats.values()])[None, None], path)[0, 0]
        for k, a in floats.items():
            images[k], levels = Image.fromarray(levels[:a.size].reshape(a.shape), "L"), levels[a.size:]
    images = [np.asarray(im if im.size == (SIDE, SIDE) else im.resize((SIDE, SIDE), Image.Resampling.BILINEAR),
                         np.uint8) for im in images]
    lab = np.array(labels, np.int64)
    stray = np.flatnonzero(lab < 0)
    if 0 < len(stray) < len(lab):
        log.warning("%s: %d of %d images are not directly in a digit-named class folder (such as %s): the "
                    "folder is read without labels", path, len(stray), len(lab), files[stray[0]])
    return Digits(np.stack(images), None if len(stray) else lab, str(path))


def _gray(im):
    """An 8-bit grayscale copy of a Pillow image; 16-bit levels (0-65535) scaled to 8, not clipped at 255
    as Pillow's convert("L") would. A 32-bit integer image is 16-bit where it holds levels above 255."""
    from PIL import Image

    if not (im.mode == "I" or im.mode.startswith("I;16")):
        return im.convert("L")
    a = np.asarray(im, np.float64)
    if im.mode != "I" or a.max() > 255:
        a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _generated(path: Path) -> tuple[list[Path], list[dict]]:
    """The PNGs and arrays a `gantk generate` folder's manifest lists (so its grid.png is not taken for a digit)."""
    import json

    try:
        doc = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return [], []
    if not isinstance(doc, dict) or doc.get("kind") != "gantk-generate-manifest":
        return [], []
    files = [path / row["file"] for row in sorted(doc.get("files", []), key=lambda r: r["index"])]
    return files, doc.get("arrays", [])


def _generated_arrays(path: Path, arrays: list[dict]) -> Digits:
    """A `generate --format npy` folder's images, one per index in index order: shards and overlapping
    ranges (runs of several --count) merged."""
    by_index: dict[int, np.ndarray] = {}
    for a in arrays:
        file = path / str(a.get("file"))
        try:
            images = _as_uint8(np.load(file, allow_pickle=False), file)
            indices = range(a["first"], a["stop"], a["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{file}: not readable as the manifest lists it ({type(e).__name__}: {e})") from None
        if len(images) != len(indices):
            raise DataError(f"{file}: {len(images)} images where the manifest lists {len(indices)}")
        for i, im in zip(indices, images):
            by_index.setdefault(i, im)
    return Digits(_resize(np.stack([by_index[i] for i in sorted(by_index)])), None, str(path))


def _resize(images: np.ndarray) -> np.ndarray:
    """Resize (N, H, W) uint8 to 32x32 (bilinear, antialiased), as torchvision's Resize(32) would."""
    if images.shape[1:] == (SIDE, SIDE):
        return np.ascontiguousarray(images)
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).float().unsqueeze(1)
    y = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).squeeze(1).numpy()


# ---------------------------------------------------------------- synthetic digits


def synthetic(count: int, *, seed: int = 0) -> Digits:
    """`count` digits 0-9 drawn with Pillow: several sizes and stroke widths, random affine jitter.

    Deterministic for (count, seed). White strokes on black, like MNIST.
    """
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = {size: ImageFont.load_default(size) for size in (30, 34, 38)}
    labels = rng.integers(0, 10, count)
    images = np.empty((count, SIDE, SIDE), np.uint8)
    canvas = 64
    for i, label in enumerate(labels):
        im = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(im)
        font = fonts[(30, 34, 38)[rng.integers(3)]]
        stroke = int(rng.integers(0, 4))
        draw.text((canvas / 2, canvas / 2), str(label), fill=255, font=font, anchor="mm",
                  stroke_width=stroke, stroke_fill=255)
        im = im.transform((canvas, canvas), Image.Transform.AFFINE, _jitter(rng, canvas),
                          resample=Image.Resampling.BILINEAR)
        images[i] = np.asarray(im.resize((SIDE, SIDE), Image.Resampling.LANCZOS))
    return Digits(images, labels.astype(np.int64), f"synthetic(seed={seed})")


def _jitter(rng: np.random.Generator, canvas: int) -> tuple[float, ...]:
    """Inverse affine coefficients for a random rotation, scale, shear and shift about the centre."""
    angle = np.deg2rad(rng.uniform(-15, 15))
    scale = rng.uniform(0.85, 1.15)
    shear = rng.uniform(-0.2, 0.2)
    tx, ty = rng.uniform(-3, 3, 2)
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    a, b, d, e = c, s + shear * c, -s, c - shear * s
    cx = cy = canvas / 2
    return (a, b, cx - a * cx - b * cy + tx, d, e, cy - d * cx - e * cy + ty)

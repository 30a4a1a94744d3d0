"""The digit classifier gantk trains itself, and whose feature space `gantk eval` measures in.

A small LeNet-like CNN: two 5x5 conv blocks, a 128-d penultimate layer (the *features* that
Fréchet distance, KID and precision/recall use) and 10 logits. `train` holds out a split and
stores its accuracy in the checkpoint; checkpoints have kind "gantk-classifier", are written
atomically and load with `torch.load(weights_only=True)` only.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import CheckpointError, DamagedFileError, DataError

log = logging.getLogger(__name__)

FORMAT = 1
KIND = "gantk-classifier"
FEATURE_DIM = 128
WIDTH = 16
NUM_CLASSES = 10
OUTLIER_WEIGHT = 0.5   # weight of the outlier-exposure term (cross-entropy to the uniform distribution)


def build(*, width: int = WIDTH, feature_dim: int = FEATURE_DIM):
    """The CNN as an nn.Module with `.features(x)` (B, feature_dim) and `forward(x)` logits (B, 10)."""
    import torch
    from torch import nn

    class DigitNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, width, 5), nn.BatchNorm2d(width), nn.ReLU(True),  # (B,w,28,28)
                nn.MaxPool2d(2),  # (B,w,14,14)
                nn.Conv2d(width, 2 * width, 5), nn.BatchNorm2d(2 * width), nn.ReLU(True),  # (B,2w,10,10)
                nn.MaxPool2d(2),  # (B,2w,5,5)
                nn.Flatten(),  # (B,50w)
                nn.Dropout(0.25),
                nn.Linear(50 * width, feature_dim), nn.ReLU(True),  # (B,feature_dim)
            )
            self.head = nn.Linear(feature_dim, NUM_CLASSES)  # (B,10)

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    return DigitNet()


@dataclass
class Classifier:
    """A loaded classifier: the eval-mode model, its checkpoint's metadata, and the file's sha256."""

    model: Any
    meta: dict[str, Any]
    sha256: str
    path: str = ""

    @property
    def heldout_accuracy(self) -> float:
        return float(self.meta["heldout_accuracy"])

    def predict(self, images: np.ndarray, *, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Features (N, 128) float32 and softmax probabilities (N, 10) of uint8 images (N, 32, 32)."""
        return embed(self.model, images, batch_size=batch_size)


def embed(model, images: np.ndarray, *, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from .data import to_tensor

    feats, probs = [], []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            f = model.features(to_tensor(np.ascontiguousarray(images[i:i + batch_size])))
            feats.append(f.numpy())
            probs.append(torch.softmax(model.head(f), 1).numpy())
    dim = model.head.in_features
    return (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
            np.concatenate(probs) if probs else np.zeros((0, NUM_CLASSES), np.float32))


# ---------------------------------------------------------------- training


def data_sha256(images: np.ndarray, labels: np.ndarray | None = None) -> str:
    """A content hash of a data set (images, and labels when given)."""
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return h.hexdigest()


def split(n: int, *, heldout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (train, held-out) index arrays; the held-out share is `heldout` of n (at least 1).

    DataError if that leaves fewer than 10 images to train on."""
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * heldout)))
    if n - k < 10:
        raise DataError(f"holding out {heldout:g} of {n} images leaves {max(n - k, 0)} to train on (need 10+)")
    return order[k:], order[:k]


def train(images: np.ndarray, labels: np.ndarray | None, *, epochs: int = 6, heldout: float = 0.1,
          seed: int = 0, batch_size: int = 128, lr: float = 3e-3, source: str = "",
          progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train the classifier on uint8 images (N, 32, 32) with labels; return its checkpoint state."""
    import torch

    _check_labels(images, labels)
    tr, ho = split(len(images), heldout=heldout, seed=seed)
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(tr) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        loss = _epoch(model, opt, sched, images[tr], labels[tr], batch_size=batch_size, rng=rng)
        acc = accuracy(model, images[ho], labels[ho])
        log.info("classifier epoch %d/%d: loss %.4f, held-out accuracy %.4f", epoch + 1, epochs, loss, acc)
        if progress:
            progress({"event": "epoch", "epoch": epoch + 1, "epochs": epochs, "loss": loss, "heldout_accuracy": acc})
    return _state(model, images, labels, n_train=len(tr), n_heldout=len(ho), epochs=epochs, seed=seed,
                  source=source, heldout_accuracy=accuracy(model, images[ho], labels[ho]),
                  outlier_exposure=OUTLIER_WEIGHT)


def _check_labels(images: np.ndarray, labels: np.ndarray | None) -> None:
    if labels is None:
        raise DataError("the classifier needs labelled digits; this source has no labels "
                        "(use mnist, synthetic, an IDX file with its labels file beside it, "
                        "digit-named subfolders, or an .npz with 'labels')")
    if len(images) < 20:
        raise DataError(f"{len(images)} labelled images are too few to train and hold out a split (need 20+)")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"labels must be digits 0-9, found {labels.min()}..{labels.max()}")
    present = np.unique(labels)
    if len(present) < NUM_CLASSES:
        log.warning("the labels hold only the digits %s: the classifier cannot recognise the others, and eval's "
                    "confidence, mode coverage and class histogram assume all ten", " ".join(map(str, present)))


def _epoch(model, opt, sched, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
           rng: np.random.Generator) -> float:
    """One epoch of cross-entropy with random +-2 px shifts, plus outlier exposure; mean loss."""
    import torch
    import torch.nn.functional as F

    from .data import to_tensor

    model.train()
    order, total = rng.permutation(len(images)), 0.0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        x = _shift(to_tensor(images[idx]), rng)
        loss = F.cross_entropy(model(x), torch.from_numpy(labels[idx]))
        model.eval()  # outliers must not move BatchNorm's statistics: the feature space stays the digits'
        loss = loss + OUTLIER_WEIGHT * -F.log_softmax(model(outliers(len(idx) // 2 + 1, rng)), 1).mean()
        model.train()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
    return total / len(order)


def outliers(n: int, rng: np.random.Generator):
    """(n, 1, 32, 32) images in [-1, 1] that are no digit: uniform pixel noise and random grids of strokes.

    Outlier exposure (Hendrycks et al. 2019): the classifier is trained to give these a uniform
    softmax, so its confidence means something on inputs that are no digit (without it, uniform
    noise scored a mean confidence of 1.000). Smooth random blobs were tried too and left out: they
    pulled blurred digits into the real digits' feature manifold. Blur and other corruptions of real
    digits are left out on purpose: those are for the metrics to judge, not for the classifier to learn."""
    import torch

    g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    k = n // 2
    pixels = torch.rand(k, 1, 32, 32, generator=g) * 2 - 1
    strokes = torch.rand(n - k, 1, 32, 1, generator=g) * torch.rand(n - k, 1, 1, 32, generator=g) > 0.6
    return torch.cat([pixels, strokes.float() * 2 - 1])


def _shift(x, rng: np.random.Generator):
    """Shift the whole batch by one random offset of up to 2 px (padding with background, -1)."""
    import torch.nn.functional as F

    dx, dy = rng.integers(-2, 3, 2)
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    return x[:, :, 2 + dy:34 + dy, 2 + dx:34 + dx]


def accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    _, probs = embed(model, images)
    return float((probs.argmax(1) == labels).mean())


def _state(model, images, labels, **meta: Any) -> dict[str, Any]:
    from .checkpoint import versions

    return {"format": FORMAT, "kind": KIND, "versions": versions(), "feature_dim": FEATURE_DIM,
            "width": WIDTH, "data_sha256": data_sha256(images, labels), "n_images": len(images),
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()}, **meta}


def fit(spec: str, *, out: str | Path, count: int | None = None, epochs: int = 6, heldout: float = 0.1,
        seed: int = 0, progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """`gantk classifier train`: load labelled digits from `spec`, train, save to `out`; a summary."""
    import time

    from . import data

    out = Path(out)
    _check_out(out)
    digits = data.load(spec, seed=seed, count=count)
    t0 = time.perf_counter()
    state = train(digits.images, digits.labels, epochs=epochs, heldout=heldout, seed=seed,
                  source=digits.source, progress=progress)
    save(state, out)
    from .checkpoint import sha256

    return {"out": str(out), "sha256": sha256(out), "data": digits.source, "images": len(digits),
            "train": state["n_train"], "heldout": state["n_heldout"], "epochs": epochs,
            "heldout_accuracy": state["heldout_accuracy"], "seconds": round(time.perf_counter() - t0, 1)}


def _check_out(out: Path) -> None:
    """Replace only a classifier gantk wrote; anything else at `out` is the user's."""
    from .checkpoint import check_writable

    if out.is_dir():
        raise CheckpointError(f"--out {out} is a folder; give a file path such as {out / 'classifier.pt'}")
    check_writable(out, "--out")  # before training, not after
    if not out.exists():
        return
    try:
        load(out)
    except DamagedFileError as e:
        raise DamagedFileError(f"{e}; not overwriting it (remove it, or choose another --out)") from None
    except CheckpointError:
        raise CheckpointError(f"{out} exists and is not a gantk classifier; not overwriting it "
                              "(choose another --out)") from None


# ---------------------------------------------------------------- files


def save(state: dict[str, Any], path: str | Path) -> None:
    from . import checkpoint

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(state, path)


def load(path: str | Path) -> Classifier:
    """Load a classifier checkpoint (weights_only=True, never a fallback); CheckpointError otherwise."""
    from . import checkpoint

    path = Path(path)
    state = _read(path)
    if not isinstance(state, dict) or state.get("kind") != KIND:
        kind = state.get("kind") if isinstance(state, dict) else None
        what = f"a {kind!r} file" if kind else "not a gantk file"
        raise CheckpointError(f"{path}: {what}, not a digit classifier ('{KIND}'); "
                              "train one with `gantk classifier train`")
    if state.get("format", 0) > FORMAT:
        raise CheckpointError(f"{path}: classifier format {state['format']} is newer than this gantk ({FORMAT})")
    model = build(width=state["width"], feature_dim=state["feature_dim"])
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: classifier weights do not fit ({str(e).splitlines()[0]})") from None
    meta = {k: v for k, v in state.items() if k != "model"}
    return Classifier(model.eval().requires_grad_(False), meta, checkpoint.sha256(path), str(path))


def _read(path: Path) -> Any:
    from . import checkpoint

    if not path.is_file():
        raise CheckpointError(f"classifier not found: {path} (train one with `gantk classifier train`)")
    return checkpoint.read_weights_only(path, what="classifier checkpoint")

"""Score generated digits against real ones in the feature space of gantk's own digit classifier.

`load_reference(spec, classifier=...)` loads real digits and holds out `heldout` of them, drawn at random
with a fixed seed (files such as MNIST's are ordered by writer, so their end is no fair sample): the
rest is the *training side* (Gaussian statistics, the k-NN manifold, the memorisation search), the
held-out part gives the *reference row*, scored exactly like samples so the numbers mean something.
Its features are cached under `<cache>/eval/`, keyed by the data's and the classifier's sha256.

`score(images, classifier=..., reference=...)` returns the metrics as a flat dict (see `score`);
`evaluate(sources, ...)` is `gantk eval`: load samples (PNG folders, .npy/.npz, or models), score
them and the held-out row, and optionally draw the one-page report (`gantk.eval_report`).
"""
from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as M
from .classifier import FEATURE_DIM, Classifier
from .errors import DataError, UsageError

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: the held-out digits are a random draw (1: the file's last ones)
MIN_SAMPLES = FEATURE_DIM + 1  # fewer and the feature covariance cannot have full rank
BIASED_BELOW = 5000  # FID at smaller N is noticeably biased upward
MEMO_QUANTILE = 0.05  # "closer than real held-out digits usually are": their 5th percentile
PR_MAX = 10_000  # points per side for precision/recall
KNN_K = 3
RECOGNISED = 0.5  # top-1 probability from which a sample counts as the digit it looks most like
WEAK_CLASSIFIER = 0.95  # held-out accuracy below which the classifier-based figures are flagged
DEFAULT_COUNT = 10_000
SPLIT_SEED = 0  # which digits are held out: the same ones on every call


@dataclass
class Reference:
    """Real digits in the classifier's feature space: the training side and the held-out row."""

    source: str
    key: str
    images: np.ndarray  # (N, 32, 32) uint8, training side
    features: np.ndarray  # (N, 128)
    mu: np.ndarray
    sigma: np.ndarray
    heldout: np.ndarray  # (H, 32, 32) uint8
    heldout_features: np.ndarray
    heldout_probs: np.ndarray
    threshold: float  # memorisation: pixel distance below which a sample counts as a copy

    _pixels: np.ndarray | None = None

    @property
    def feature_rms(self) -> float:
        """Root mean square of the training side's features, which KID divides features by."""
        return float(np.sqrt(np.mean(np.square(self.features, dtype=np.float64)))) or 1.0

    @property
    def pixels(self) -> np.ndarray:
        """The training side as float32 (N, 1024) in [0, 1], for nearest-neighbour search."""
        if self._pixels is None:
            self._pixels = _flat(self.images)
        return self._pixels


@dataclass
class Analysis:
    """Scores of one sample set: the metrics dict plus per-sample arrays the report draws from."""

    images: np.ndarray
    metrics: dict[str, Any]
    confidence: np.ndarray  # (N,) top-1 probability
    predicted: np.ndarray  # (N,) top-1 class
    nn_distance: np.ndarray  # (N,) pixel distance to the nearest training-side image
    nn_index: np.ndarray  # (N,) its index in Reference.images


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


# ---------------------------------------------------------------- reference


def load_reference(spec: Any, *, classifier: Classifier, heldout: int | None = None,
              cache_dir: str | Path | None = None) -> Reference:
    """Real digits from `spec` (a data spec or a `Digits`), split and embedded (cached on disk)."""
    from . import data
    from .classifier import data_sha256

    digits = spec if isinstance(spec, data.Digits) else data.load(str(spec), flag="--reference")
    h = _heldout_size(len(digits), heldout)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits))
    train, held = digits.images[np.sort(order[h:])], digits.images[np.sort(order[:h])]
    key = hashlib.sha256(f"{data_sha256(digits.images)}:{classifier.sha256}:{h}:{CACHE_VERSION}"
                         .encode()).hexdigest()[:24]
    path = Path(cache_dir or data.default_cache() / "eval") / f"reference-{key}.npz"
    stats = _read_cache(path) or _write_cache(path, _embed_reference(train, held, classifier))
    return Reference(digits.source, key, train, stats["features"], stats["mu"], stats["sigma"], held,
                     stats["heldout_features"], stats["heldout_probs"], float(stats["threshold"]))


def _heldout_size(n: int, heldout: int | None) -> int:
    h = heldout if heldout is not None else max(MIN_SAMPLES, min(2000, n // 5))
    if heldout is not None and n >= 2 * MIN_SAMPLES and not MIN_SAMPLES <= heldout <= n - MIN_SAMPLES:
        raise UsageError(f"--heldout {heldout}: the reference set has {n} images, so it can hold out "
                         f"{MIN_SAMPLES} to {n - MIN_SAMPLES} (each side needs at least {MIN_SAMPLES})")
    if h < MIN_SAMPLES or n - h < MIN_SAMPLES:
        raise DataError(f"the reference set has {n} images: too few to hold out {h} and keep the rest "
                        f"(each side needs at least {MIN_SAMPLES})")
    return h


def _embed_reference(train: np.ndarray, held: np.ndarray, classifier: Classifier) -> dict[str, np.ndarray]:
    log.info("embedding %d reference and %d held-out digits", len(train), len(held))
    feats, _ = classifier.predict(train)
    held_feats, held_probs = classifier.predict(held)
    mu, sigma = M.gaussian(feats)
    dist, _ = M.nearest(_flat(held), _flat(train))
    return {"features": feats, "mu": mu, "sigma": sigma, "heldout_features": held_feats,
            "heldout_probs": held_probs, "threshold": np.float64(np.quantile(dist, MEMO_QUANTILE))}


_CACHED = ("features", "mu", "sigma", "heldout_features", "heldout_probs", "threshold")


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            stats = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        stats = {}
    if not set(_CACHED) <= set(stats):
        log.warning("ignoring unreadable reference cache %s (rebuilt)", path)
        return None
    log.info("reference statistics from cache %s", path)
    return stats


def _write_cache(path: Path, stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from .checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **stats)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:  # a read-only cache costs time, not correctness
        log.warning("could not cache reference statistics in %s (%s)", path, e)
    return stats


# ---------------------------------------------------------------- scoring


def score(images_uint8: np.ndarray, *, classifier: Classifier | str | Path,
          reference: Reference | str, seed: int = 0) -> dict[str, Any]:
    """Metrics of uint8 digits (N, 32, 32) against `reference` (a Reference, or a data spec).

    Returns: count, fid (lower is better), kid and kid_se (lower), confidence (mean top-1, higher),
    class_entropy (mode coverage: the class histogram's entropy / log 10 times the share of samples
    recognised as a digit, 1 = every sample a recognised digit and all digits equally often; with
    outlier exposure the classifier recognises no digit in noise), class_hist (10 counts of the
    recognised samples), recognised (share with top-1 >= RECOGNISED), precision and recall (k=3
    manifolds, higher), memorised (share of samples closer to a training-side image than 95% of real
    held-out digits are; about 0.05 for real held-out digits),
    and warnings (list of str). DataError if there are fewer than MIN_SAMPLES images.
    """
    if not isinstance(classifier, Classifier):
        from .classifier import load

        classifier = load(classifier)
    if not isinstance(reference, Reference):
        reference = load_reference(reference, classifier=classifier)
    return analyse(images_uint8, classifier=classifier, reference=reference, seed=seed).metrics


def analyse(images: np.ndarray, *, classifier: Classifier, reference: Reference, seed: int = 0,
            features: tuple[np.ndarray, np.ndarray] | None = None) -> Analysis:
    """Score `images` and keep the per-sample arrays (for the report)."""
    images = _check_images(images)
    feats, probs = features if features is not None else classifier.predict(images)
    nn_dist, nn_idx = M.nearest(_flat(images), reference.pixels)
    conf = M.confidence(probs)
    out = {"count": len(images), **_distribution(feats, reference, seed=seed), **_classes(probs, conf),
           "confidence": float(conf.mean()), "memorised": float((nn_dist < reference.threshold).mean()),
           "warnings": _warnings(len(images), classifier)}
    return Analysis(images, out, conf, probs.argmax(1), nn_dist, nn_idx)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != (32, 32) or images.dtype != np.uint8:
        raise DataError(f"expected uint8 digits (N, 32, 32), got {images.dtype} {images.shape}")
    if len(images) < MIN_SAMPLES:
        raise DataError(f"{len(images)} samples are too few: the metrics need at least {MIN_SAMPLES} "
                        f"(Fréchet distance needs more samples than the {FEATURE_DIM} feature dimensions)")
    return images


def _distribution(feats: np.ndarray, ref: Reference, *, seed: int) -> dict[str, float]:
    """FID, KID, precision and recall: the samples' features against the training side."""
    if not np.isfinite(feats).all():
        raise DataError(f"the classifier gave non-finite features for {int((~np.isfinite(feats)).any(1).sum())} "
                        f"of {len(feats)} samples; retrain it (`gantk classifier train`)")
    mu, sigma = M.gaussian(feats)
    scale = ref.feature_rms  # the cubic kernel wants features of order 1, as Inception's are
    kid, kid_se = M.kid(feats / scale, ref.features / scale, seed=seed)
    rng = np.random.default_rng(seed)
    n = min(len(feats), len(ref.features), PR_MAX)
    fake = feats if len(feats) == n else feats[rng.choice(len(feats), n, replace=False)]
    real = ref.features[rng.choice(len(ref.features), n, replace=False)]
    precision, recall = M.precision_recall(real, fake, k=KNN_K)
    return {"fid": M.frechet(mu, sigma, ref.mu, ref.sigma), "kid": kid, "kid_se": kid_se,
            "precision": precision, "recall": recall}


def _classes(probs: np.ndarray, conf: np.ndarray) -> dict[str, Any]:
    """Mode coverage among the samples the classifier recognises as digits (top-1 `conf` >= RECOGNISED)."""
    seen = conf >= RECOGNISED
    hist = M.class_histogram(probs[seen])
    share = float(seen.mean())
    return {"class_entropy": M.normalised_entropy(hist) * share, "class_hist": [int(c) for c in hist],
            "recognised": share}


def _warnings(n: int, classifier: Classifier) -> list[str]:
    out = []
    if n < BIASED_BELOW:
        out.append(f"FID is biased upward at small sample counts (N={n} < {BIASED_BELOW}): "
                   "compare FID only between sets of the same N")
    if classifier.heldout_accuracy < WEAK_CLASSIFIER:
        out.append(f"this classifier is {classifier.heldout_accuracy:.1%} accurate on its held-out digits (below "
                   f"{WEAK_CLASSIFIER:.0%}): it recognises few real digits either, so confidence, recognised share "
                   "and mode coverage mean little; train it longer or on more digits")
    if "outlier_exposure" not in classifier.meta:
        out.append("this classifier was trained without outlier exposure: it is confident on images that are "
                   "no digit, so confidence, recognised share and mode coverage overrate them; retrain it "
                   "with `gantk classifier train`")
    return out


def heldout_row(reference: Reference, classifier: Classifier, *, seed: int = 0) -> Analysis:
    """The held-out real digits scored like samples: the row that says what 'good' looks like."""
    return analyse(reference.heldout, classifier=classifier, reference=reference, seed=seed,
                   features=(reference.heldout_features, reference.heldout_probs))


# ---------------------------------------------------------------- samples


MODEL_SUFFIXES = {".pt", ".pth", ".ckpt", ".onnx", ".ts", ".torchscript"}


def load_samples(source: str | Path, *, count: int | None = None, seed: int = 0,
                 provider: str = "auto") -> tuple[np.ndarray, str]:
    """uint8 digits (N, 32, 32) from a PNG folder, an .npy/.npz, or a model; and what they came from."""
    from . import data

    path = Path(source)
    if not path.exists():
        raise UsageError(f"nothing to evaluate at {path} (expected a folder of images, .npy/.npz or a model)")
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run folder: its last.pt, not its sample grids
        from .checkpoint import resolve

        path = resolve(path)
    if path.is_file() and path.suffix.lower() in MODEL_SUFFIXES:
        return _sample_model(path, count=count or DEFAULT_COUNT, seed=seed, provider=provider)
    digits = data.load_path(path)
    images = digits.images if count is None else digits.images[:count]
    return images, f"{path} ({len(images)} images)"


def _sample_model(path: Path, *, count: int, seed: int, provider: str) -> tuple[np.ndarray, str]:
    """`count` digits from a checkpoint, ONNX or TorchScript file, with generate's noise per index."""
    from .backends import open_backend
    from .data import check_memory
    from .generate import noise, to_pixels

    check_memory(count, 4 * 1024, "samples (pixels, then the classifier's inputs)")
    backend = open_backend(_backend_kind(path), path, provider=provider, fmt="npy")  # writes no files: the npy plan
    chunks = [to_pixels(backend(noise(seed, range(i, min(i + 1000, count)), backend.latent_shape)))
              for i in range(0, count, 1000)]
    return np.concatenate(chunks), f"{path} ({backend.name}, {count} samples, seed {seed})"


def _backend_kind(path: Path) -> str:
    from .exporters import export_kind

    return {"checkpoint": "torch", "torchscript": "torchscript", "onnx": "onnxruntime"}[export_kind(path)]


# ---------------------------------------------------------------- gantk eval


def evaluate(sources: list[str | Path], *, classifier: str | Path, reference: str = "mnist",
             count: int | None = None, seed: int = 0, heldout: int | None = None,
             cache_dir: str | Path | None = None, report: str | Path | None = None,
             provider: str = "auto") -> dict[str, Any]:
    """`gantk eval`: score each source and the held-out real row; the PNG report shows the first source.

    Several sources (say the fp32 and fp16 exports of one checkpoint) are scored with the same noise,
    classifier and reference, so their rows compare directly.
    """
    from .classifier import load

    if not sources:
        raise UsageError("nothing to evaluate: give a folder of images, an .npy/.npz or a model")
    if report:
        from .eval_report import check_out

        check_out(report)
    clf = load(classifier)
    loaded = [load_samples(src, count=count, seed=seed, provider=provider) for src in sources]
    for images, _ in loaded:
        _check_images(images)  # fail on bad samples before embedding the reference
    ref = load_reference(reference, classifier=clf, heldout=heldout, cache_dir=cache_dir)
    rows = [analyse(images, classifier=clf, reference=ref, seed=seed) for images, _ in loaded]
    real = heldout_row(ref, clf, seed=seed)
    doc = {"classifier": {"path": str(classifier), "sha256": clf.sha256, "heldout_accuracy": clf.heldout_accuracy,
                          "trained_on": clf.meta.get("source", "")},
           "reference": {"source": ref.source, "key": ref.key, "train": len(ref.images),
                         "heldout": len(ref.heldout), "memorisation_threshold": ref.threshold},
           "rows": [{"source": described, **row.metrics} for (_, described), row in zip(loaded, rows)],
           "real_heldout": real.metrics}
    if report:
        from .eval_report import write

        write(report, samples=rows[0], real=real, reference=ref, title=loaded[0][1])
        doc["report"] = str(report)
    return doc

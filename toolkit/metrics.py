"""Sample-quality metrics on feature vectors and class probabilities (numpy and scipy only).

- `frechet`: Fréchet distance between two Gaussians fitted to features (FID, in a digit classifier's
  feature space rather than Inception's).
- `kid`: kernel inception distance (unbiased MMD^2, cubic polynomial kernel) over random subsets,
  with the spread of the subset estimates.
- `precision_recall`: the k-NN manifold estimate of Kynkäänniemi et al. (2019).
- `class_histogram`, `normalised_entropy`, `confidence`: what the classifier says about the samples.
- `nearest`: nearest-neighbour distances (chunked), used for the memorisation check.
"""
from __future__ import annotations

import numpy as np

CHUNK = 1024


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features (N, D)."""
    x = np.asarray(features, np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)); a small ridge when the product is singular."""
    import warnings

    from scipy import linalg

    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular products are expected (collapse)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            ridge = np.eye(len(mu1)) * 1e-6
            covmean = linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    covmean = np.real(covmean)
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def kid(x: np.ndarray, y: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID of features x vs y: mean unbiased MMD^2 over `subsets` random subsets, and its subset std.

    Subsets hold m = `subset_size` points per side, or half the smaller set if that is less, so that
    both sides vary (a subset as large as its set is that set every time: a std of 0). The std is the
    spread of the subset estimates, as torch-fidelity reports it: with sets much larger than m it is
    about the standard error of one estimate from m points per side; with sets of 2m it read 0.5-0.9x
    that (tests/test_eval.py). The subsets overlap, so std / sqrt(subsets) would understate it more.
    """
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(x) // 2, len(y) // 2)
    if m < 2:
        raise ValueError(f"KID needs at least 4 points per set, got {len(x)} and {len(y)}")
    est = [_mmd2(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
           for _ in range(subsets)]
    return float(np.mean(est)), float(np.std(est, ddof=1)) if subsets > 1 else 0.0


def _mmd2(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel k(u, v) = (u.v / d + 1)^3, equal-size sets."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m, d = len(a), a.shape[1]
    kaa, kbb, kab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    off = m * (m - 1)
    return float((kaa.sum() - np.trace(kaa)) / off + (kbb.sum() - np.trace(kbb)) / off - 2 * kab.mean())


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b)), clipped at 0, in float32."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of a: distance to its nearest row of b, and that row's index."""
    dist, idx = np.empty(len(a), np.float32), np.empty(len(a), np.int64)
    for i in range(0, len(a), CHUNK):
        d = squared_distances(a[i:i + CHUNK], b)
        idx[i:i + CHUNK] = d.argmin(1)
        dist[i:i + CHUNK] = np.sqrt(d[np.arange(len(d)), idx[i:i + CHUNK]])
    return dist, idx


def knn_radii(x: np.ndarray, *, k: int = 3) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row."""
    radii = np.empty(len(x), np.float32)
    for i in range(0, len(x), CHUNK):
        d = squared_distances(x[i:i + CHUNK], x)
        radii[i:i + CHUNK] = np.sqrt(np.partition(d, k, axis=1)[:, k])  # column 0 is the point itself
    return radii


def coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Share of points inside at least one ball (centre, radius)."""
    inside = np.zeros(len(points), bool)
    r2 = (radii.astype(np.float32) ** 2)[None, :]
    for i in range(0, len(points), CHUNK):
        inside[i:i + CHUNK] = (squared_distances(points[i:i + CHUNK], centres) <= r2).any(1)
    return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: precision = fakes on the real manifold, recall = reals on the fake one."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set")
    precision = coverage(fake, real, knn_radii(real, k=k))
    recall = coverage(real, fake, knn_radii(fake, k=k))
    return precision, recall


def class_histogram(probs: np.ndarray, *, classes: int = 10) -> np.ndarray:
    """How many samples the classifier assigns to each class (top-1)."""
    return np.bincount(probs.argmax(1), minlength=classes)


def normalised_entropy(counts: np.ndarray) -> float:
    """Entropy of a class histogram divided by log(classes): 1 = uniform, 0 = a single class."""
    p = counts / max(counts.sum(), 1)
    p = p[p > 0]
    return max(0.0, float(-(p * np.log(p)).sum() / np.log(len(counts))))  # no -0.0


def confidence(probs: np.ndarray) -> np.ndarray:
    """Top-1 softmax probability of each sample."""
    return probs.max(1)

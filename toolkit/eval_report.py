"""The one-page PNG report of `gantk eval`: metrics beside the real held-out row, the class histogram,
a sample grid, the worst-scored samples, and the samples nearest to a training image beside it.
Drawn with matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import numpy as np

ROWS = [("fid", "FID", "{:.2f}"), ("kid", "KID x1000", "{:.2f}"), ("confidence", "confidence", "{:.3f}"),
        ("recognised", "recognised", "{:.3f}"), ("class_entropy", "mode coverage", "{:.3f}"), ("precision", "precision", "{:.3f}"),
        ("recall", "recall", "{:.3f}"), ("memorised", "memorised", "{:.3f}"), ("count", "N", "{}")]


MARK = "gantk eval report"  # the PNG's Description: a file holding it is ours to replace


def check_out(path: str | Path) -> None:
    """UsageError unless `path` is free or holds an earlier report: the user's files are never replaced."""
    from PIL import Image, UnidentifiedImageError

    from .checkpoint import check_writable
    from .errors import UsageError

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--report {path} is a folder; give a file path such as {path / 'report.png'}")
    check_writable(path, "--report")  # the folders are made when the report is written
    if not path.exists():
        return
    try:
        with Image.open(path) as im:
            ours = im.format == "PNG" and im.text.get("Description") == MARK
    except (UnidentifiedImageError, OSError):
        ours = False
    if not ours:
        raise UsageError(f"--report {path} exists and is not a gantk eval report; not overwriting it "
                         "(choose another --report)")


def write(path: str | Path, *, samples, real, reference, title: str = "") -> None:
    """Draw the report of `samples` (an Analysis) against `real` (the held-out Analysis) into `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_write

    fig = plt.figure(figsize=(14, 9), dpi=100)
    grid = fig.add_gridspec(2, 3, width_ratios=[1.5, 1, 1])
    _table(fig.add_subplot(grid[0, 0]), samples.metrics, real.metrics)
    _histogram(fig.add_subplot(grid[0, 1]), samples.metrics["class_hist"], real.metrics["class_hist"])
    _images(fig.add_subplot(grid[0, 2]), samples.images[:64], cols=8, title="samples (first 64)")
    worst = np.argsort(samples.confidence)[:16]
    _images(fig.add_subplot(grid[1, 0]), samples.images[worst], cols=4,
            title="worst-scored (lowest top-1 confidence)",
            labels=[f"{samples.predicted[i]}:{samples.confidence[i]:.2f}" for i in worst])
    _pairs(fig.add_subplot(grid[1, 1:]), samples, reference)
    fig.suptitle(f"gantk eval: {title}\nreference {reference.source}, {len(reference.images)} training-side "
                 f"and {len(reference.heldout)} held-out real digits", fontsize=10)
    with warnings.catch_warnings():  # "tight layout not applied" on some tables: the page is fine
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", metadata={"Description": MARK}))
    plt.close(fig)


def _table(ax, m: dict, r: dict) -> None:
    ax.axis("off")
    cells = [[label, _fmt(m, key, fmt), _fmt(r, key, fmt)] for key, label, fmt in ROWS]
    table = ax.table(cellText=cells, colLabels=["metric", "samples", "real held-out"], cellLoc="left",
                     colWidths=[0.34, 0.33, 0.33], bbox=[0, 0.25, 1, 0.75])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    ax.set_title("metrics (classifier feature space)", fontsize=9)
    note = "\n".join(textwrap.fill(w, 100) for w in m.get("warnings", []))  # within this panel's width
    if note:
        ax.text(0, 0.2, note, fontsize=7, transform=ax.transAxes, va="top")


def _fmt(m: dict, key: str, fmt: str) -> str:
    value = m[key] * 1000 if key == "kid" else m[key]
    text = fmt.format(value)
    return f"{text} ± {m['kid_se'] * 1000:.2f}" if key == "kid" else text


def _histogram(ax, hist: list[int], real: list[int]) -> None:
    x = np.arange(10)
    share, real_share = np.array(hist) / max(sum(hist), 1), np.array(real) / max(sum(real), 1)
    ax.bar(x - 0.2, share, 0.4, label="samples")
    ax.bar(x + 0.2, real_share, 0.4, label="real held-out", alpha=0.7)
    ax.set_xticks(x)
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("share")
    ax.set_title("class histogram")
    ax.legend(fontsize=8)


def _images(ax, images: np.ndarray, *, cols: int, title: str, labels: list[str] | None = None) -> None:
    ax.imshow(_mosaic(images, cols=cols), cmap="gray", vmin=0, vmax=255)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    for j, text in enumerate(labels or []):
        ax.text((j % cols) * 34 + 1, (j // cols) * 34 + 7, text, color="yellow", fontsize=7)


def _pairs(ax, samples, reference, n: int = 12) -> None:
    """Top row: the samples closest to a training image; bottom row: that training image."""
    order = np.argsort(samples.nn_distance)[:n]
    pairs = np.concatenate([samples.images[order], reference.images[samples.nn_index[order]]])
    _images(ax, pairs, cols=len(order),
            title=f"nearest-neighbour pairs: sample (top) and its nearest training image (bottom); "
                  f"copy threshold {reference.threshold:.2f}",
            labels=[f"{samples.nn_distance[i]:.2f}" for i in order])


def _mosaic(images: np.ndarray, *, cols: int, pad: int = 2) -> np.ndarray:
    n = max(len(images), 1)
    rows = -(-n // cols)
    out = np.full((rows * (32 + pad), cols * (32 + pad)), 40, np.uint8)
    for j, im in enumerate(images):
        r, c = divmod(j, cols)
        out[r * (32 + pad):r * (32 + pad) + 32, c * (32 + pad):c * (32 + pad) + 32] = im
    return out

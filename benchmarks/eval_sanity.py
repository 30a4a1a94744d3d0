"""Do gantk eval's metrics separate real digits from bad sets? One table, every metric, on real digits.

Sets (each the size of the held-out split): real held-out digits, uniform noise, the held-out digits
blurred (Gaussian, sigma 1.5 px), one held-out digit repeated, and copies of reference (training-side)
digits. A metric works when the real row is clearly better than each bad row.

    .venv/bin/python benchmarks/eval_sanity.py --classifier CLF [--reference ../shared/data/mnist/t10k-images-idx3-ubyte.gz]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from gantk import classifier as C
from gantk import evaluate as E

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
COLUMNS = ("fid", "kid", "confidence", "class_entropy", "precision", "recall", "memorised")


def blur(images: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    out = np.stack([gaussian_filter(im.astype(np.float32), sigma) for im in images])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--reference", default=str(MNIST))
    ap.add_argument("--heldout", type=int, default=2000)
    a = ap.parse_args()
    clf = C.load(a.classifier)
    ref = E.load_reference(a.reference, classifier=clf, heldout=a.heldout)
    held = ref.heldout
    sets = {"real held-out": held,
            "uniform noise": np.random.default_rng(0).integers(0, 256, held.shape, dtype=np.uint8),
            "blurred (sigma 1.5 px)": blur(held), "one repeated digit": np.repeat(held[:1], len(held), 0),
            "copies of training digits": ref.images[:len(held)]}
    print(f"classifier {a.classifier}: held-out accuracy {clf.heldout_accuracy:.4f}, "
          f"outlier exposure {clf.meta.get('outlier_exposure', 'none')}; N = {len(held)} a row")
    print("| set | FID | KID x1e3 (± se) | conf | entropy | precision | recall | memorised |")
    print("|---|---|---|---|---|---|---|---|")
    for name, images in sets.items():
        s = E.score(images, classifier=clf, reference=ref)
        print(f"| {name} | {s['fid']:.2f} | {1e3 * s['kid']:.2f} ± {1e3 * s['kid_se']:.2f} | {s['confidence']:.3f} | "
              f"{s['class_entropy']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | {s['memorised']:.3f} |")


if __name__ == "__main__":
    main()

"""Does `gantk eval` track a classifier it has never seen? Checkpoints of one run, scored two ways.

gantk's metrics (its own CNN classifier) against the same kind of figures in the feature space of an
independent digit model built here: a different architecture (an MLP on raw pixels), a different
optimiser (SGD with momentum, no augmentation, no outlier exposure) and a different seed, trained on
the reference's training side only. For every numbered checkpoint of the run, both score the same
samples (generate's noise per index); the script prints both and their Spearman rank correlation over
the checkpoints: whatever improves one should improve the other.

    .venv/bin/python benchmarks/metric_agreement.py RUN_DIR --classifier CLF \
        [--reference ../shared/data/mnist/t10k-images-idx3-ubyte.gz] [--count 2000] [--every 4]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from gantk import classifier as C
from gantk import evaluate as E
from gantk import metrics as M
from gantk.data import to_tensor

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"


def independent_model(images: np.ndarray, labels: np.ndarray, *, epochs: int = 10, seed: int = 7):
    """An MLP 1024-512-128-10 on raw pixels; its 128-d hidden layer is the feature space."""
    torch.manual_seed(seed)
    body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 128), torch.nn.ReLU())
    model = torch.nn.Sequential(body, torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = to_tensor(images), torch.from_numpy(labels.astype(np.int64))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(x)), len(x) // 64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return body.eval(), model.eval()


def embed(body, model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        x = to_tensor(images)
        return body(x).numpy().astype(np.float64), torch.softmax(model(x), 1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--reference", default=str(MNIST))
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--every", type=int, default=1, help="Score every n-th numbered checkpoint.")
    a = ap.parse_args()
    from gantk import data

    clf = C.load(a.classifier)
    ref = E.load_reference(a.reference, classifier=clf, heldout=2000)
    digits = data.load(a.reference)
    train_side = slice(0, len(digits) - 2000)
    body, model = independent_model(digits.images[train_side], digits.labels[train_side])
    real_feats, _ = embed(body, model, digits.images[train_side])
    mu, sigma = M.gaussian(real_feats)
    held_feats, held_probs = embed(body, model, ref.heldout)
    acc = float((held_probs.argmax(1) == digits.labels[len(digits) - 2000:]).mean())
    print(f"independent MLP: held-out accuracy {acc:.4f}; gantk classifier {a.classifier}; N = {a.count} a row")
    print("| checkpoint | gantk FID | gantk KID x1e3 | gantk conf | gantk coverage | independent FID | independent conf |")
    print("|---|---|---|---|---|---|---|")
    ckpts = sorted(a.run.glob("checkpoints/step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[::a.every]
    ours, theirs = [], []
    rows = [(p.stem, E.load_samples(p, count=a.count)[0]) for p in ckpts] + [("real held-out", ref.heldout)]
    for name, images in rows:
        s = E.score(images, classifier=clf, reference=ref)
        feats, probs = embed(body, model, images)
        fid = M.frechet(*M.gaussian(feats), mu, sigma)
        print(f"| {name} | {s['fid']:.2f} | {1e3 * s['kid']:.1f} | {s['confidence']:.3f} | {s['class_entropy']:.3f} | "
              f"{fid:.2f} | {probs.max(1).mean():.3f} |")
        if name != "real held-out":
            ours.append(s["fid"])
            theirs.append(fid)
    if len(ours) > 2:
        rho = spearmanr(ours, theirs)
        print(f"Spearman rank correlation of the two FIDs over {len(ours)} checkpoints: {rho.statistic:.3f} "
              f"(p = {rho.pvalue:.2g})")


if __name__ == "__main__":
    main()

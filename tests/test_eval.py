"""gantk eval and gantk classifier: metrics that separate real digits from bad ones, and bad input.

One tiny classifier is trained on synthetic digits per module; the reference set is other synthetic
digits, split into a training side and held-out real digits. Each metric is asserted where it is
meant to flag a failure: FID, KID and recall flag every bad set; precision flags noise and blur;
confidence flags noise (the classifier is trained with outlier exposure) and blur, not a repeated clean
digit, which entropy and recall catch; memorisation flags copies of training images.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from gantk import classifier as C
from gantk import data
from gantk import evaluate as E
from gantk.cli import cli
from gantk.errors import CheckpointError, DataError, UsageError

HELDOUT = 400


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def clf_path(work):
    digits = data.synthetic(1500, seed=1)
    state = C.train(digits.images, digits.labels, epochs=6, batch_size=32, seed=0, source=digits.source)
    path = work / "classifier.pt"
    C.save(state, path)
    return path


@pytest.fixture(scope="module")
def clf(clf_path):
    return C.load(clf_path)


@pytest.fixture(scope="module")
def ref_path(work):
    path = work / "reference.npy"
    np.save(path, data.synthetic(1400, seed=2).images)
    return path


@pytest.fixture(scope="module")
def ref(clf, ref_path, work):
    return E.load_reference(str(ref_path), classifier=clf, heldout=HELDOUT, cache_dir=work / "cache")


def _blur(images: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    out = np.stack([gaussian_filter(im.astype(np.float32), sigma) for im in images])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def scores(clf, ref):
    rng = np.random.default_rng(0)
    held = ref.heldout
    sets = {"real": held, "noise": rng.integers(0, 256, held.shape, dtype=np.uint8), "blurred": _blur(held),
            "repeated": np.repeat(held[:1], len(held), 0), "copies": ref.images[:len(held)]}
    return {name: E.score(images, classifier=clf, reference=ref) for name, images in sets.items()}


# ---------------------------------------------------------------- classifier


def test_classifier_learns_and_stores_heldout_accuracy(clf):
    assert clf.meta["kind"] == C.KIND
    assert clf.heldout_accuracy > 0.85
    assert clf.meta["n_heldout"] == 150 and clf.meta["n_train"] == 1350
    feats, probs = clf.predict(data.synthetic(8, seed=3).images)
    assert feats.shape == (8, C.FEATURE_DIM) and probs.shape == (8, 10)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)


def test_a_classifier_trained_on_some_digits_only_says_so(caplog):
    d = data.synthetic(40, seed=1)
    with caplog.at_level(logging.WARNING, logger="gantk"):
        C.train(d.images, np.full(40, 3), epochs=1)
    assert "the labels hold only the digits 3: the classifier cannot recognise the others" in caplog.text


def test_classifier_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "gan.pt"
    torch.save({"kind": "gantk-checkpoint", "format": 1}, path)
    with pytest.raises(CheckpointError, match="not a digit classifier"):
        C.load(path)


def test_classifier_load_never_unpickles_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": C.KIND, "payload": Image.new("L", (2, 2))}, path)
    with pytest.raises(CheckpointError, match="not a readable classifier"):
        C.load(path)


# ---------------------------------------------------------------- metrics separate real from bad


@pytest.mark.parametrize("bad", ["noise", "blurred", "repeated"])
def test_fid_kid_and_recall_flag_every_bad_set(scores, bad):
    real, other = scores["real"], scores[bad]
    assert other["fid"] > 5 * real["fid"]
    assert other["kid"] - 3 * other["kid_se"] > real["kid"] + 3 * real["kid_se"]
    assert other["recall"] < real["recall"] - 0.3


@pytest.mark.parametrize("bad", ["noise", "blurred"])
def test_precision_flags_off_manifold_sets(scores, bad):
    assert scores[bad]["precision"] < scores["real"]["precision"] - 0.3


@pytest.mark.parametrize("bad", ["noise", "blurred"])
def test_confidence_flags_images_that_are_no_clean_digit(scores, bad):
    assert scores[bad]["confidence"] < scores["real"]["confidence"] - 0.1


@pytest.mark.parametrize("bad", ["noise", "repeated"])
def test_class_entropy_flags_collapsed_sets(scores, bad):
    assert scores["real"]["class_entropy"] > 0.95
    assert scores[bad]["class_entropy"] < scores["real"]["class_entropy"] - 0.3


def test_memorisation_flags_copies_of_training_images(scores):
    assert scores["copies"]["memorised"] > 0.9
    assert scores["real"]["memorised"] < 0.15
    assert scores["noise"]["memorised"] == 0.0


def test_class_histogram_and_counts(scores):
    real = scores["real"]
    assert real["count"] == HELDOUT and sum(real["class_hist"]) == round(real["recognised"] * HELDOUT)
    assert real["recognised"] > 0.9 and scores["noise"]["recognised"] < 0.1
    assert max(scores["repeated"]["class_hist"]) == sum(scores["repeated"]["class_hist"]) > 0


def test_small_sample_fid_bias_is_stated(scores):
    assert any("biased" in w for w in scores["real"]["warnings"])


def test_a_weak_classifier_is_stated(clf):
    from dataclasses import replace

    from gantk.evaluate import _warnings

    weak = replace(clf, meta={**clf.meta, "heldout_accuracy": 0.67})
    strong = replace(clf, meta={**clf.meta, "heldout_accuracy": 0.99})
    assert any("67.0% accurate" in w for w in _warnings(10_000, weak))
    assert not any("accurate" in w for w in _warnings(10_000, strong))


# ---------------------------------------------------------------- API


def test_score_is_deterministic_and_takes_paths(clf_path, ref_path, ref, work, monkeypatch):
    monkeypatch.setattr(E, "_embed_reference", lambda *a, **k: pytest.fail("cache not used"))
    images = ref.heldout[:200]
    again = E.load_reference(str(ref_path), classifier=C.load(clf_path), heldout=HELDOUT, cache_dir=work / "cache")
    a = E.score(images, classifier=clf_path, reference=again)
    b = E.score(images, classifier=C.load(clf_path), reference=ref)
    assert a == b


def test_a_cache_missing_a_member_is_rebuilt(clf, ref_path, tmp_path, caplog):
    first = E.load_reference(str(ref_path), classifier=clf, heldout=HELDOUT, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("reference-*.npz")
    with np.load(cached) as z:
        np.savez(cached.with_suffix(".tmp.npz"), **{k: z[k] for k in z.files if k != "threshold"})
    cached.with_suffix(".tmp.npz").replace(cached)
    with caplog.at_level(logging.WARNING, logger="gantk"):
        again = E.load_reference(str(ref_path), classifier=clf, heldout=HELDOUT, cache_dir=tmp_path)
    assert again.threshold == first.threshold and "ignoring unreadable reference cache" in caplog.text


def test_too_few_samples_is_a_data_error(clf, ref):
    with pytest.raises(DataError, match="too few"):
        E.score(ref.heldout[:E.MIN_SAMPLES - 1], classifier=clf, reference=ref)


@pytest.mark.parametrize("heldout", [0, -5, 1400])
def test_a_heldout_the_reference_cannot_give_is_a_usage_error_naming_the_range(clf, ref_path, work, heldout):
    with pytest.raises(UsageError, match=f"--heldout {heldout}: the reference set has 1400 images, so it can hold "
                                         f"out {E.MIN_SAMPLES} to {1400 - E.MIN_SAMPLES}"):
        E.load_reference(str(ref_path), classifier=clf, heldout=heldout, cache_dir=work / "cache")


def test_the_default_heldout_of_a_small_reference_is_the_least_that_scores():
    """A fifth of 400 images is too few to score; the least that does (MIN_SAMPLES) is held out instead."""
    assert E._heldout_size(400, None) == E.MIN_SAMPLES
    assert E._heldout_size(10000, None) == 2000
    with pytest.raises(DataError, match="too few"):
        E._heldout_size(2 * E.MIN_SAMPLES - 1, None)


def test_frechet_of_identical_gaussians_is_zero():
    from gantk import metrics as M

    x = np.random.default_rng(0).normal(size=(500, 8))
    mu, sigma = M.gaussian(x)
    assert M.frechet(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6)
    assert M.frechet(mu + 1, sigma, mu, sigma) == pytest.approx(8, rel=1e-4)


def test_kid_spread_counts_both_sides_of_small_sets():
    from gantk import metrics as M

    rng = np.random.default_rng(0)
    draw = lambda n, shift: rng.normal(shift, 1, (n, 16))  # noqa: E731
    value, se = M.kid(draw(600, 0.3), draw(600, 0), subsets=50)  # both below subset_size: m = 300
    fresh = np.std([M._mmd2(draw(300, 0.3), draw(300, 0)) for _ in range(40)], ddof=1)
    assert value > 0 and 0.3 < se / fresh < 1.6  # it was 0: every subset was the whole of both sets


def test_the_heldout_digits_are_a_random_draw_not_the_end_of_the_file(clf, tmp_path):
    images = data.synthetic(600, seed=4).images
    ordered = images[np.argsort(images.reshape(600, -1).sum(1))]  # ordered like MNIST's writers
    np.save(tmp_path / "ordered.npy", ordered)
    ref = E.load_reference(str(tmp_path / "ordered.npy"), classifier=clf, heldout=200, cache_dir=tmp_path / "c")
    ink = lambda a: a.reshape(len(a), -1).sum(1).mean()  # noqa: E731
    assert abs(ink(ref.heldout) - ink(ordered)) < 0.1 * (ink(ordered[-200:]) - ink(ordered))
    assert sorted(im.tobytes() for im in np.concatenate([ref.images, ref.heldout])) == \
        sorted(im.tobytes() for im in ordered)


def test_non_finite_features_are_a_data_error(clf, ref):
    images = ref.heldout[:200]
    feats, probs = clf.predict(images)
    feats[3, 5] = np.nan
    with pytest.raises(DataError, match="non-finite features for 1 of 200 samples"):
        E.analyse(images, classifier=clf, reference=ref, features=(feats, probs))


# ---------------------------------------------------------------- CLI


def _eval(args, clf_path, ref_path, work):
    base = ["eval", *map(str, args), "--classifier", str(clf_path), "--reference", str(ref_path),
            "--heldout", str(HELDOUT), "--cache-dir", str(work / "cache")]
    return CliRunner().invoke(cli, base)


def test_cli_eval_npy_json_and_report(clf_path, ref_path, ref, work, tmp_path):
    np.save(tmp_path / "held.npy", ref.heldout)
    r = _eval([tmp_path / "held.npy", "--json", "--report", tmp_path / "report.png"], clf_path, ref_path, work)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["rows"][0]["count"] == HELDOUT and doc["real_heldout"]["count"] == HELDOUT
    assert doc["rows"][0]["fid"] == pytest.approx(doc["real_heldout"]["fid"], abs=1e-6)
    with Image.open(tmp_path / "report.png") as im:
        assert im.size[0] >= 1000
    r = _eval([tmp_path / "held.npy", "--report", tmp_path / "report.png"], clf_path, ref_path, work)
    assert r.exit_code == 0, r.output  # an earlier report is replaced
    mine = tmp_path / "mine.png"
    Image.new("L", (4, 4)).save(mine)
    r = _eval([tmp_path / "held.npy", "--report", mine], clf_path, ref_path, work)
    assert r.exit_code == 2 and "not a gantk eval report" in r.stderr, r.output
    with Image.open(mine) as im:
        assert im.size == (4, 4)  # the user's file, as it was
    r = _eval([tmp_path / "held.npy", "--report", tmp_path / "new" / "sub" / "r.png"], clf_path, ref_path, work)
    assert r.exit_code == 0 and (tmp_path / "new" / "sub" / "r.png").is_file(), r.output  # folders made
    r = _eval([tmp_path / "held.npy", "--report", mine / "r.png"], clf_path, ref_path, work)
    assert r.exit_code == 2 and "is a file, not a folder" in r.stderr, r.output


def test_cli_eval_converts_wrong_size_and_mode_pngs(clf_path, ref_path, ref, work, tmp_path):
    folder = tmp_path / "rgb"
    folder.mkdir()
    for i, im in enumerate(ref.heldout[:150]):
        Image.fromarray(im).convert("RGB").resize((28, 28)).save(folder / f"{i:03d}.png")
    r = _eval([folder, "--json"], clf_path, ref_path, work)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"][0]["count"] == 150


def _checkpoint(path):
    from gantk.checkpoint import KIND, save
    from gantk.models import build_generator

    torch.manual_seed(0)
    g = build_generator("seed")
    state = {"format": 1, "kind": KIND, "config": {"arch": "seed"}, "latent_shape": list(g.latent_shape),
             "step": 0, "generator": g.state_dict(), "ema": None}
    save(state, path)
    return path


def test_cli_eval_a_run_folder_beside_its_fp16_export(clf_path, ref_path, work, tmp_path):
    from gantk.exporters import EXPORTERS

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "samples").mkdir()
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "run" / "samples" / "latest.png")  # a grid
    EXPORTERS["onnx"](ckpt, tmp_path / "fp16.onnx", dtype="fp16")
    r = _eval([tmp_path / "run", tmp_path / "fp16.onnx", "--count", "200", "--json"], clf_path, ref_path, work)
    assert r.exit_code == 0, r.output
    eager, half = json.loads(r.stdout)["rows"]
    assert eager["count"] == half["count"] == 200  # the run folder is its last.pt, not its sample grids
    assert "torch" in eager["source"] and "onnxruntime" in half["source"]
    assert half["fid"] == pytest.approx(eager["fid"], rel=0.05)  # same noise, same model, fp16 inside
    r = _eval([tmp_path / "fp16.onnx", "--count", str(10**14)], clf_path, ref_path, work)  # refused, not swapped
    assert r.exit_code == 2 and "100,000,000,000,000 samples (pixels, then the classifier's inputs) need about" \
        in r.stderr and "more than this machine's" in r.stderr, r.output


@pytest.mark.parametrize("case, message", [("empty", "no images"), ("few", "too few"), ("kind", "not a digit classifier"),
                                           ("missing", "nothing to evaluate")])
def test_cli_eval_bad_input_exits_2(case, message, clf_path, ref_path, ref, work, tmp_path):
    source, classifier = tmp_path / "empty", clf_path
    source.mkdir()
    if case == "few":
        source = tmp_path / "few.npy"
        np.save(source, ref.heldout[:50])
    elif case == "kind":
        np.save(tmp_path / "ok.npy", ref.heldout)
        source, classifier = tmp_path / "ok.npy", tmp_path / "gan.pt"
        torch.save({"kind": "gantk-checkpoint", "format": 1}, classifier)
    elif case == "missing":
        source = tmp_path / "nope"
    r = _eval([source], classifier, ref_path, work)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_cli_eval_finds_the_classifier_in_runs_dir_and_info_describes_it(clf_path, clf, ref_path, ref, work,
                                                                         tmp_path):
    import shutil

    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy(clf_path, runs / "classifier.pt")
    np.save(tmp_path / "held.npy", ref.heldout)
    r = CliRunner().invoke(cli, ["eval", str(tmp_path / "held.npy"), "--runs-dir", str(runs), "--reference",
                                 str(ref_path), "--heldout", str(HELDOUT), "--cache-dir", str(work / "cache")])
    assert r.exit_code == 0, r.output
    assert f"classifier: {runs / 'classifier.pt'}" in r.stderr
    r = CliRunner().invoke(cli, ["info", str(runs / "classifier.pt"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kind"] == "classifier" and d["heldout_accuracy"] == clf.heldout_accuracy
    assert d["outputs"][0]["shape"] == ["N", clf.meta["feature_dim"]] and d["parameters"] > 0


def test_cli_classifier_train_and_its_bad_input(tmp_path):
    out = tmp_path / "clf.pt"
    r = CliRunner().invoke(cli, ["classifier", "train", "--data", "synthetic", "--count", "300", "--epochs", "1",
                                 "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["heldout"] == 30 and 0 <= doc["heldout_accuracy"] <= 1
    assert C.load(out).meta["heldout_accuracy"] == doc["heldout_accuracy"]

    np.save(tmp_path / "unlabelled.npy", data.synthetic(50, seed=0).images)
    r = CliRunner().invoke(cli, ["classifier", "train", "--data", str(tmp_path / "unlabelled.npy"),
                                 "--out", str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and "labels" in r.output

    r = CliRunner().invoke(cli, ["classifier", "train", "--data", "synthetic", "--count", "40", "--heldout", "0.99",
                                 "--out", str(tmp_path / "y.pt")])
    assert r.exit_code == 2 and "holding out 0.99 of 40 images leaves 0 to train on (need 10+)" in r.output

    (tmp_path / "afile").write_text("mine")  # checked before training, not after it
    r = CliRunner().invoke(cli, ["classifier", "train", "--data", "synthetic", "--count", "40", "--out",
                                 str(tmp_path / "afile" / "c.pt")])
    assert r.exit_code == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in r.output and "epoch 1/" not in r.output

    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"user data")
    r = CliRunner().invoke(cli, ["classifier", "train", "--data", "synthetic", "--count", "100", "--out", str(mine)])
    assert r.exit_code == 2 and "not overwriting" in r.output
    assert mine.read_bytes() == b"user data"


def test_classifier_train_onto_a_damaged_classifier_says_it_is_damaged(tmp_path, clf_path, damage):
    bad = damage(clf_path, tmp_path / "clf.pt")
    before = bad.read_bytes()
    r = CliRunner().invoke(cli, ["classifier", "train", "--data", "synthetic", "--count", "100", "--out", str(bad)])
    assert r.exit_code == 2 and "a damaged" in r.stderr and "does not match the CRC-32" in r.stderr, r.output
    assert "not overwriting it (remove it, or choose another --out)" in r.stderr
    assert bad.read_bytes() == before

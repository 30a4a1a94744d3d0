"""Training: models, data sources, the run folder, exact resume, signals, divergence, bad input."""
from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gantk import checkpoint as ckpt
from gantk import data, models
from gantk.cli import cli
from gantk.config import TrainConfig
from gantk.errors import DataError, DivergedError, Interrupted, UsageError
from gantk.train import EVAL_METRICS, Trainer, train


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def tiny(**kw) -> TrainConfig:
    base = dict(data="synthetic", data_count=96, epochs=2, arch="seed", log_every=2, checkpoint_every=2)
    return TrainConfig(**{**base, **kw})


def weights_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k][n], b[k][n]) for k in ("generator", "discriminator", "ema") for n in a[k])


# ------------------------------------------------------------------ models


def layer_shapes(net: torch.nn.Sequential, x: torch.Tensor, kinds: tuple) -> list[tuple]:
    """The output shape (batch dropped) after every layer of one of `kinds`."""
    shapes = []
    for layer in net:
        x = layer(x)
        if isinstance(layer, kinds):
            shapes.append(tuple(x.shape[1:]))
    return shapes


def test_seed_generator_layer_shapes():
    g = models.seed_generator()
    shapes = layer_shapes(g.net, torch.zeros(2, 1, 6, 6), (torch.nn.ConvTranspose2d,))
    assert shapes == [(128, 10, 10), (64, 14, 14), (32, 18, 18), (16, 22, 22), (8, 26, 26), (4, 30, 30), (1, 32, 32)]
    assert isinstance(g.net[-1], torch.nn.Tanh)
    assert all(m.stride == (1, 1) for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d))


def test_seed_discriminator_is_lenet5():
    d = models.seed_discriminator()
    shapes = layer_shapes(d.net, torch.zeros(2, 1, 32, 32), (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.Linear))
    assert shapes == [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (120,), (84,), (1,)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == 2


@pytest.mark.parametrize("arch", sorted(models.ARCHS))
def test_every_arch_maps_noise_to_images(arch):
    g, d = models.build(arch)
    img = g.eval()(torch.randn(3, *g.latent_shape))
    assert img.shape == (3, 1, 32, 32) and img.abs().max() <= 1
    assert d(img).shape == (3,)


def test_seed_flops_match_the_known_count():
    f = models.flops_per_image(models.seed_generator())
    assert round(f["useful"] / 1e6) == 74 and round(f["padded"] / 1e6) == 132


# ------------------------------------------------------------------ data


def write_idx(path: Path, arr: np.ndarray, *, gz: bool) -> Path:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.mark.parametrize("gz", [True, False])
def test_idx_images_and_labels_load_and_resize(tmp_path, gz):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    p = write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", imgs, gz=gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(5), gz=gz)
    d = data.load(str(p))
    assert d.images.shape == (5, 32, 32) and d.images.dtype == np.uint8
    assert d.labels.tolist() == [0, 1, 2, 3, 4]
    t = data.to_tensor(d.images)
    assert t.shape == (5, 1, 32, 32) and t.min() >= -1 and t.max() <= 1


@pytest.mark.parametrize("images, labels", [("t10k-images.idx3-ubyte", "t10k-labels.idx1-ubyte"),
                                             ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte")])
def test_idx_labels_are_found_beside_other_namings(tmp_path, images, labels):
    """Some copies of MNIST put a dot before idx; a .gz images file may sit beside raw labels."""
    p = write_idx(tmp_path / images, np.zeros((3, 28, 28)), gz=images.endswith(".gz"))
    write_idx(tmp_path / labels, np.array([4, 0, 9]), gz=False)
    assert data.load(str(p)).labels.tolist() == [4, 0, 9]


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_16_bit_and_float_images_in_a_folder_are_scaled_not_clipped(tmp_path, mode):
    from PIL import Image

    levels = np.random.default_rng(2).integers(0, 256, (3, 32, 32)).astype(np.uint8)
    as_mode = {"I;16": levels.astype(np.uint16) * 257, "I": levels.astype(np.int32) * 257,
               "F": levels.astype(np.float32) / 255}[mode]
    for i, a in enumerate(as_mode):
        im = Image.fromarray(a)
        assert im.mode == mode
        im.save(tmp_path / f"{i}.{'tif' if mode != 'I;16' else 'png'}")
    assert np.array_equal(data.load(str(tmp_path)).images, levels)
    # a faint image is read in the same range as the rest, not guessed alone
    faint = np.zeros((32, 32), np.uint8)
    faint[5, 5] = 1
    as_faint = {"I;16": faint.astype(np.uint16) * 257, "I": faint.astype(np.int32) * 257,
                "F": faint.astype(np.float32) / 255}[mode]
    Image.fromarray(as_faint).save(tmp_path / f"9.{'tif' if mode != 'I;16' else 'png'}")
    assert np.array_equal(data.load(str(tmp_path)).images[-1], faint)


def test_truncated_idx_is_named(tmp_path):
    p = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 28, 28)), gz=False)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"x-idx3-ubyte: IDX data is 3126 bytes, its header's shape \(4, 28, 28\) "
                                        r"holds 3136 \(cut short\)"):
        data.load(str(p))
    p.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00" + bytes(8))  # a header of no images, then bytes
    with pytest.raises(DataError, match=r"declares shape \(0,\), which holds no data"):
        data.load(str(p))


def test_npy_npz_and_folder_sources(tmp_path):
    from PIL import Image

    arr = np.random.default_rng(1).random((4, 28, 28), dtype=np.float32)
    np.save(tmp_path / "a.npy", arr)
    np.savez(tmp_path / "b.npz", images=(arr * 255).astype(np.uint8), labels=np.arange(4))
    folder = tmp_path / "imgs" / "7"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray((arr[i] * 255).astype(np.uint8)).convert("RGB").save(folder / f"{i}.png")
    assert data.load(str(tmp_path / "a.npy")).images.shape == (4, 32, 32)
    assert data.load(str(tmp_path / "b.npz")).labels.tolist() == [0, 1, 2, 3]
    # above 255, below -1, [0, 255] mixed with negative values, normalised like torchvision's MNIST examples
    for bad in (arr * 1000, arr * 2 - 1.5, arr * 255 - 100, (arr - 0.1307) / 0.3081, arr * 8, arr - 0.5):
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(DataError, match=r"pixel values from .*; expected \[0, 1\], \[-1, 1\] or \[0, 255\]"):
            data.load(str(tmp_path / "bad.npy"))
    want = data.load(str(tmp_path / "a.npy")).images
    for scale, shift, ends in ((255, 0, (-0.3, 255.4)), (1, 0, (-0.004, 1.004)), (2, -1, (-1.004, 1.004)),
                               (1, 0, (-0.02, 1.02)), (1, 0, (-0.27, 1.24)), (255, 0, (-20, 270))):
        near = (arr * scale + shift).astype(np.float32)  # with a little overshoot at both ends (resampling, noise)
        near[0, 0, :2] = ends
        np.save(tmp_path / "near.npy", near)
        got = data.load(str(tmp_path / "near.npy")).images
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 0.1, scale  # read in its own range
    np.save(tmp_path / "u16.npy", (arr * 255).astype(np.uint16) * 257)  # 16-bit levels
    assert np.array_equal(data.load(str(tmp_path / "u16.npy")).images, data.load(str(tmp_path / "b.npz")).images)
    for kind in (np.bool_, np.int64, np.uint8):  # 0/1 masks: ink is 255, whatever the dtype (uint8 is levels)
        np.save(tmp_path / "mask.npy", (arr > 0.5).astype(kind))
        expect = 1 if kind is np.uint8 else 255
        assert data.load(str(tmp_path / "mask.npy")).images.max() == expect, kind
    np.save(tmp_path / "flat.npy", np.zeros((5, 0, 28), np.float32))
    with pytest.raises(DataError, match=r"expected images of shape \(N, H, W\) or \(N, 1, H, W\), got \(5, 0, 28\)"):
        data.load(str(tmp_path / "flat.npy"))
    np.savez(tmp_path / "s.npz", images=(arr * 255).astype(np.uint8), labels=np.array(list("abcd")))
    with pytest.raises(DataError, match="labels must be whole numbers .*, got <U1"):
        data.load(str(tmp_path / "s.npz"))
    (tmp_path / "text.npy").write_text("0.5, 0.25\n")
    with pytest.raises(DataError, match=r"text.npy: not a NumPy .npy or .npz file \(no NumPy or zip header\)"):
        data.load(str(tmp_path / "text.npy"))
    np.save(tmp_path / "complex.npy", arr.astype(np.complex64))
    with pytest.raises(DataError, match="images of dtype complex64; expected numbers"):
        data.load(str(tmp_path / "complex.npy"))
    np.savez(tmp_path / "c.npz", images=(arr * 255).astype(np.uint8), labels=np.arange(4) + 0.7)
    with pytest.raises(DataError, match="labels must be whole numbers"):  # not floored into other classes
        data.load(str(tmp_path / "c.npz"))
    f = data.load(str(tmp_path / "imgs"))
    assert f.images.shape == (3, 32, 32) and f.labels.tolist() == [7, 7, 7]


def test_an_image_beside_the_class_folders_is_named_as_why_labels_are_gone(tmp_path, caplog):
    from PIL import Image

    (tmp_path / "imgs" / "3").mkdir(parents=True)
    for name in ("3/a.png", "3/b.png", "preview.png"):
        Image.new("L", (28, 28)).save(tmp_path / "imgs" / name)
    with caplog.at_level(logging.WARNING, logger="gantk"):
        d = data.load(str(tmp_path / "imgs"))
    assert len(d) == 3 and d.labels is None
    stray = tmp_path / "imgs" / "preview.png"
    assert f"1 of 3 images are not directly in a digit-named class folder (such as {stray})" in caplog.text


def test_a_count_that_drops_classes_says_so(tmp_path, caplog):
    """Warned where the first N hold under half the classes a random draw of N would: a class-sorted file."""
    images = np.zeros((30, 28, 28), np.uint8)
    np.savez(tmp_path / "mixed.npz", images=images, labels=np.arange(30) % 3)
    np.savez(tmp_path / "sorted.npz", images=images, labels=np.arange(30) // 10)
    assert len(data.load(str(tmp_path / "mixed.npz"), count=10)) == 10 and not caplog.records
    assert len(data.load(str(tmp_path / "sorted.npz"), count=10)) == 10
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'sorted.npz'}: its first 10 images (a count takes them in file order) hold 1 of its 3 classes"]
    caplog.clear()
    labels = np.repeat(np.arange(10), 600)  # half the classes of a sorted file are missed, too
    np.savez(tmp_path / "tens.npz", images=np.zeros((6000, 28, 28), np.uint8), labels=labels)
    assert len(data.load(str(tmp_path / "tens.npz"), count=3000)) == 3000 and len(caplog.records) == 1
    caplog.clear()
    np.savez(tmp_path / "random.npz", images=np.zeros((6000, 28, 28), np.uint8),
             labels=np.random.default_rng(0).permutation(labels))
    for count in (5, 12, 32):  # a random order, classes missing by chance (5 images hold 5 at most): no warning
        data.load(str(tmp_path / "random.npz"), count=count)
    assert not caplog.records


def test_synthetic_digits_are_deterministic_and_labelled():
    a, b, c = data.synthetic(20, seed=3), data.synthetic(20, seed=3), data.synthetic(20, seed=4)
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert a.images.shape == (20, 32, 32) and set(a.labels) <= set(range(10))
    assert a.images.max() == 255 and (a.images == 0).mean() > 0.5  # white strokes on black


# ------------------------------------------------------------------ the run folder and resume


def test_train_cli_writes_a_complete_run_folder(tmp_path):
    r = run_cli("train", "--data", "synthetic", "--data-count", "64", "--epochs", "2", "--arch", "seed",
                "--log-every", "1", "--runs-dir", str(tmp_path), "--run", "r", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    run = tmp_path / "r"
    assert summary["steps"] == 4 and summary["device"] == "cpu"
    assert json.loads((run / "config.json").read_text())["arch"] == "seed"
    assert (run / "checkpoints" / "last.pt").exists() and (run / "loss.png").exists()
    assert sorted(p.name for p in (run / "samples").glob("epoch-*.png")) == ["epoch-0001.png", "epoch-0002.png"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"step", "epoch", "loss_d", "loss_g", "d_x", "d_g_z", "img_per_s", "elapsed_s",
                            "fid", "kid", "precision", "recall", "class_entropy", "recognised", "confidence"}
    assert rows[0]["fid"] == ""  # no evaluation asked for
    state = ckpt.load(run / "checkpoints" / "last.pt")
    assert state["step"] == 4 and state["config"]["arch"] == "seed" and state["latent_shape"] == [1, 6, 6]


def test_sample_grid_uses_the_exported_generator_mode(tmp_path):
    """The grid is what the EMA generator in eval mode draws from the run's fixed noise."""
    from PIL import Image

    from gantk.train import fixed_noise

    s = train(tiny(epochs=1), runs_dir=tmp_path)
    g = ckpt.generator_from(ckpt.load(s["checkpoint"]))
    with torch.no_grad():
        first = g(fixed_noise(g.latent_shape, 0)[:1])[0, 0]
    grid = np.asarray(Image.open(Path(s["run_dir"]) / "samples" / "epoch-0001.png"))
    expected = np.clip(np.rint((first.double().numpy() + 1) * 127.5), 0, 255).astype(np.uint8)
    assert np.array_equal(grid[2:34, 2:34], expected)


def test_stopped_and_resumed_run_equals_a_straight_run(tmp_path):
    straight = train(tiny(epochs=3), runs_dir=tmp_path / "a")
    first = train(tiny(epochs=3, max_steps=5), runs_dir=tmp_path / "b")
    resumed = train(tiny(epochs=3), resume=Path(first["checkpoint"]))
    assert resumed["steps"] == straight["steps"] == 9
    a, b = ckpt.load(straight["checkpoint"]), ckpt.load(resumed["checkpoint"])
    assert weights_equal(a, b)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["numpy"] == b["rng"]["numpy"]
    a = list(csv.DictReader(open(Path(straight["run_dir"]) / "metrics.csv")))
    b = list(csv.DictReader(open(Path(first["run_dir"]) / "metrics.csv")))
    assert [(r["step"], r["loss_d"], r["loss_g"]) for r in a] == [(r["step"], r["loss_d"], r["loss_g"]) for r in b]


def test_resume_drops_metrics_rows_written_after_the_checkpoint(tmp_path):
    first = train(tiny(epochs=3, max_steps=4), runs_dir=tmp_path)
    run = Path(first["run_dir"])
    with open(run / "metrics.csv", "a") as f:  # a crash after the checkpoint left rows behind
        f.write("6,1,9,9,0.5,0.5,1,1\n")
    train(tiny(epochs=3), resume=Path(first["checkpoint"]))
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 9]


def test_eval_every_logs_quality_keeps_best_and_plots_fid(tmp_path):
    from gantk import classifier

    classifier.fit("synthetic", out=tmp_path / "clf.pt", count=400, epochs=1)
    s = train(tiny(data_count=700, epochs=1, log_every=7, eval_every=10, eval_count=200,
                   classifier=str(tmp_path / "clf.pt")), runs_dir=tmp_path)
    rows = list(csv.DictReader(open(Path(s["run_dir"]) / "metrics.csv")))
    scored = {int(r["step"]): float(r["fid"]) for r in rows if r["fid"]}
    assert sorted(scored) == [10, 20] and all(v > 0 for v in scored.values())
    assert [int(r["step"]) for r in rows] == [7, 10, 14, 20, 21]
    best = ckpt.load(Path(s["run_dir"]) / "checkpoints" / "best.pt")
    assert best["best_fid"] == pytest.approx(min(scored.values()), abs=1e-5)
    assert best["step"] == min(scored, key=scored.get)
    # best.pt resumes like any checkpoint: a branch from it writes the straight run's rows after its step
    train(tiny(epochs=1), resume=Path(s["run_dir"]) / "checkpoints" / "best.pt", run_dir=tmp_path / "branch")
    branch = list(csv.DictReader(open(tmp_path / "branch" / "metrics.csv")))
    same = lambda r: {k: v for k, v in r.items() if k not in ("img_per_s", "elapsed_s")}  # noqa: E731
    assert [same(r) for r in branch] == [same(r) for r in rows if int(r["step"]) > best["step"]]


def test_the_best_fid_restarts_when_its_yardstick_changes(monkeypatch, caplog):
    """Another classifier, reference split or --eval-count (the yardstick) starts the best FID afresh; a
    checkpoint from before gantk kept the yardstick (None) keeps its best FID."""
    from types import SimpleNamespace

    from gantk import distributed, evaluate
    from gantk.train import _Evaluator

    fids = iter([5.0, 7.0, 9.0, 8.0])
    monkeypatch.setattr(evaluate, "score", lambda *a, **k: {m: next(fids) if m == "fid" else 0.5 for m in EVAL_METRICS})
    t = Trainer(TrainConfig(arch="seed", amp=False), torch.device("cpu"), distributed.from_env())
    ev = _Evaluator.__new__(_Evaluator)
    ev.classifier, ev.reference, ev.count, ev.seed = None, SimpleNamespace(key="a"), 8, 0
    assert ev(t)[1] and t.best_fid == 5.0 and t.fid_reference == "a:8"  # a fresh run: the first is the best
    warned = lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # noqa: E731
    t.fid_reference = None  # as resumed from an older checkpoint: its best FID stands
    assert not ev(t)[1] and t.best_fid == 5.0 and t.fid_reference == "a:8" and not warned()
    ev.reference = SimpleNamespace(key="b")  # resumed with another classifier
    assert ev(t)[1] and t.best_fid == 9.0 and t.fid_reference == "b:8"
    assert len(warned()) == 1 and "best.pt's FID 5.00 was measured with another classifier" in warned()[0]
    ev.count = 9  # another --eval-count
    assert ev(t)[1] and t.best_fid == 8.0 and len(warned()) == 2


def test_a_run_on_a_relative_data_path_resumes_from_another_folder(tmp_path, monkeypatch):
    np.savez(tmp_path / "d.npz", images=np.zeros((64, 28, 28), np.uint8))
    monkeypatch.chdir(tmp_path)
    r = run_cli("train", "--data", "d.npz", "--max-steps", "1", "--runs-dir", "runs", "--run", "a", "-q")
    assert r.exit_code == 0, r.output
    s = train(tiny(data="d.npz", data_count=None, max_steps=1, classifier="c.pt"), runs_dir=Path("lib"))
    stored = ckpt.load(Path(s["checkpoint"]))["config"]  # the library stores them as the CLI does
    assert (stored["data"], stored["classifier"]) == (str(tmp_path / "d.npz"), str(tmp_path / "c.pt"))
    monkeypatch.chdir(tmp_path / "runs")
    r = run_cli("train", "--resume", "a", "--max-steps", "2", "--runs-dir", ".", "--data", str(tmp_path / "d.npz"),
                "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["steps"] == 2, r.output


def test_a_resume_that_gives_eval_every_keeps_the_runs_classifier():
    from gantk.cli import _FIELDS
    from gantk.train import _resumed_config

    given = set(_FIELDS.get("eval_every", ("eval_every",)))  # what `--eval-every 2` alone sets
    asked = tiny(eval_every=2, classifier="runs/classifier.pt")  # the CLI's default classifier
    assert _resumed_config(tiny(eval_every=4, classifier="a.pt"), asked, given).classifier == "a.pt"
    assert _resumed_config(tiny(), asked, given).classifier == "runs/classifier.pt"  # evaluation starts now


def test_eval_every_without_a_classifier_is_exit_2(tmp_path):
    r = run_cli("train", "--data", "synthetic", "--data-count", "64", "--eval-every", "5",
                "--runs-dir", str(tmp_path))
    assert r.exit_code == 2 and "classifier" in r.stderr


def test_resume_continues_into_a_new_run_folder_and_keeps_the_recipe(tmp_path, trained_run):
    r = run_cli("train", "--resume", str(trained_run), "--run", "fork", "--runs-dir", str(tmp_path),
                "--epochs", "2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 8 and (tmp_path / "fork" / "config.json").exists()
    assert ckpt.load(tmp_path / "fork" / "checkpoints" / "last.pt")["step"] == 8
    r = run_cli("train", "--resume", str(trained_run), "--lr", "1e-3", "--runs-dir", str(tmp_path))
    assert r.exit_code == 2 and "lr_g" in r.stderr


def test_a_generated_folder_loads_the_digits_its_manifest_lists(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(tmp_path / f"{i:06d}.png")
    Image.fromarray(np.zeros((100, 300), np.uint8)).save(tmp_path / "grid.png")
    rows = [{"index": i, "file": f"{i:06d}.png", "sha256": ""} for i in range(3)]
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "gantk-generate-manifest", "files": rows}))
    d = data.load(str(tmp_path))
    assert len(d) == 3 and [int(im[0, 0]) for im in d.images] == [0, 40, 80]


def test_cpu_amp_trains_in_bfloat16_and_resumes_exactly(tmp_path, monkeypatch):
    seen = []
    original = Trainer._loss
    monkeypatch.setattr(Trainer, "_loss", lambda self, logits, t: seen.append(logits.dtype) or original(self, logits, t))
    straight = train(tiny(amp=True, epochs=3), runs_dir=tmp_path / "a")
    first = train(tiny(amp=True, epochs=3, max_steps=5), runs_dir=tmp_path / "b")
    resumed = train(tiny(amp=True, epochs=3), resume=Path(first["checkpoint"]))
    assert torch.bfloat16 in seen and ckpt.load(straight["checkpoint"])["scaler"] is None
    assert weights_equal(ckpt.load(straight["checkpoint"]), ckpt.load(resumed["checkpoint"]))


@pytest.mark.parametrize("native", [True, False])
def test_amp_defaults_to_bf16_where_the_cpu_has_it_and_a_resume_keeps_the_run_setting(tmp_path, monkeypatch,
                                                                                        native):
    import gantk.train as T

    monkeypatch.setattr(T, "native_bf16", lambda: native)
    r = run_cli("train", "--data", "synthetic", "--data-count", "64", "--epochs", "2", "--arch", "seed",
                "--max-steps", "2", "--runs-dir", str(tmp_path), "--run", "r")
    assert r.exit_code == 0, r.output
    assert ("bf16 autocast (auto)" if native else "fp32 (auto)") in r.stderr
    run = tmp_path / "r"
    assert json.loads((run / "config.json").read_text())["amp"] is native
    monkeypatch.setattr(T, "native_bf16", lambda: not native)  # the same run resumed on another CPU
    r = run_cli("train", "--resume", str(run), "--runs-dir", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert ("bf16 autocast," if native else "fp32,") in r.stderr
    assert ckpt.load(run / "checkpoints" / "last.pt")["config"]["amp"] is native
    r = run_cli("train", "--resume", str(run), "--runs-dir", str(tmp_path), "--no-amp" if native else "--amp")
    assert r.exit_code == 2 and "keeps the run's own amp" in r.stderr


@pytest.mark.parametrize("older", [False, True])
def test_a_resume_refuses_a_device_that_would_change_the_autocast_dtype(tmp_path, older):
    """An fp16-autocast run (CUDA) resumed on the CPU would step in bf16: refused, nothing written.
    `older`: a checkpoint from before compute_dtype was stored; its gradient scaler says fp16."""
    first = train(tiny(amp=False, max_steps=2), runs_dir=tmp_path)
    last = Path(first["checkpoint"])
    assert ckpt.load(last)["compute_dtype"] == "fp32"
    state = ckpt.load(last)
    state["config"]["amp"] = True
    if older:
        del state["compute_dtype"]
        state["scaler"] = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0}
    else:
        state["compute_dtype"] = "fp16 autocast"
    ckpt.save(state, last)
    before = sorted(p.name for p in last.parent.parent.rglob("*"))
    r = run_cli("train", "--resume", str(last), "--device", "cpu", "--runs-dir", str(tmp_path))
    assert r.exit_code == 2 and "trains in fp16 autocast" in r.stderr and "--device cuda" in r.stderr
    assert sorted(p.name for p in last.parent.parent.rglob("*")) == before


@pytest.mark.gpu
def test_a_cpu_bf16_run_is_not_resumed_on_cuda_in_fp16(tmp_path):
    first = train(tiny(amp=True, device="cpu", max_steps=2), runs_dir=tmp_path)
    r = run_cli("train", "--resume", first["checkpoint"], "--device", "cuda", "--runs-dir", str(tmp_path))
    assert r.exit_code == 2 and "trains in bf16 autocast" in r.stderr and "--device cpu" in r.stderr


def test_tutorial_recipe_and_no_amp_train_in_fp32_on_any_cpu(tmp_path, monkeypatch):
    import gantk.train as T

    monkeypatch.setattr(T, "native_bf16", lambda: True)
    for name, flag in (("t", "--recipe=tutorial"), ("n", "--no-amp")):
        r = run_cli("train", "--data", "synthetic", "--data-count", "64", "--max-steps", "1", flag,
                    "--runs-dir", str(tmp_path), "--run", name)
        assert r.exit_code == 0, r.output
        assert "fp32," in r.stderr and json.loads((tmp_path / name / "config.json").read_text())["amp"] is False
    assert run_cli("train", "--data", "synthetic", "--data-count", "64", "--max-steps", "1", "--recipe=tutorial",
                   "--amp", "--runs-dir", str(tmp_path), "--run", "ta").exit_code == 0
    assert json.loads((tmp_path / "ta" / "config.json").read_text())["amp"] is True


def test_checkpoints_are_tensors_and_plain_values(trained_run):
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["kind"] == "gantk-checkpoint" and isinstance(state["config"], dict)
    for key in ("opt_g", "opt_d", "rng", "meter", "ema", "versions"):
        assert key in state


def test_keeps_only_the_newest_numbered_checkpoints_and_the_users_files(tmp_path):
    first = train(tiny(epochs=3, keep=2, max_steps=3), runs_dir=tmp_path)
    folder = Path(first["run_dir"]) / "checkpoints"
    for name in ("step-backup.pt", "step-00000002-good.pt"):  # the user's: sort after and before gantk's
        (folder / name).write_bytes(b"mine")
    (folder / ".last.pt.x1y2.tmp").write_bytes(b"cut short by a kill")
    train(tiny(epochs=3, keep=2), resume=Path(first["checkpoint"]))
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["last.pt", "step-00000002-good.pt", "step-00000008.pt", "step-00000009.pt", "step-backup.pt"]


def test_resume_auto_does_not_pass_over_a_newer_run_that_never_saved(tmp_path, trained_run):
    import shutil

    shutil.copytree(trained_run, tmp_path / "00000-old")
    r = run_cli("train", "--data", "synthetic", "--data-count", "96", "--arch", "seed", "--max-steps", "2",
                "--checkpoint-every", "100", "--runs-dir", str(tmp_path), "--run", "new")
    assert r.exit_code == 0, r.output
    for p in (tmp_path / "new" / "checkpoints").glob("*.pt"):
        p.unlink()  # as if killed before its first save
    before = sorted((tmp_path / "00000-old").rglob("*"))
    r = run_cli("train", "--resume", "auto", "--runs-dir", str(tmp_path), "--max-steps", "99")
    assert r.exit_code == 2 and f"the newest run, {tmp_path / 'new'}, stopped before its first checkpoint" in r.stderr
    assert sorted((tmp_path / "00000-old").rglob("*")) == before
    r = run_cli("train", "--data", "synthetic", "--data-count", "96", "--arch", "seed", "--runs-dir", str(tmp_path),
                "--run", "new")
    assert r.exit_code == 2 and "holds no checkpoint" in r.stderr


def test_non_finite_loss_stops_within_one_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = Trainer._loss

    def poisoned(self, logits, target):
        loss = original(self, logits, target)
        return loss * float("nan") if self.step >= 3 else loss

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    r = run_cli("train", "--data", "synthetic", "--data-count", "96", "--arch", "seed", "--epochs", "3",
                "--checkpoint-every", "2", "--runs-dir", str(tmp_path), "--run", "r")
    assert r.exit_code == 3, r.output
    assert "diverged at step 4" in r.stderr and "the last checkpoint is step 3's" in r.stderr
    assert ckpt.load(tmp_path / "r" / "checkpoints" / "last.pt")["step"] == 3  # the epoch-end save, last good


def test_weights_made_non_finite_by_a_finite_step_are_not_saved(tmp_path, monkeypatch):
    original = Trainer.train_step

    def step(self, x, **kw):
        out = original(self, x, **kw)
        if self.step == 4:
            with torch.no_grad():
                next(self.g.parameters()).view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(Trainer, "train_step", step)
    r = run_cli("train", "--data", "synthetic", "--data-count", "96", "--arch", "seed", "--epochs", "3",
                "--checkpoint-every", "2", "--runs-dir", str(tmp_path), "--run", "r")
    assert r.exit_code == 3 and "diverged at step 4: its losses were finite but the weights are not" in r.stderr
    assert ckpt.load(tmp_path / "r" / "checkpoints" / "last.pt")["step"] == 3, r.output


def test_divergence_before_the_first_checkpoint_says_so_and_keeps_the_losses(tmp_path, monkeypatch):
    original = Trainer._loss
    monkeypatch.setattr(Trainer, "_loss", lambda self, logits, t: original(self, logits, t) * (
        float("inf") if self.step >= 4 else 1.0))
    r = run_cli("train", "--data", "synthetic", "--data-count", "320", "--arch", "seed", "--runs-dir", str(tmp_path),
                "--run", "r", "--log-every", "1")
    assert r.exit_code == 3 and "diverged at step 5" in r.stderr, r.output
    assert f"nothing was saved ({tmp_path / 'r' / 'metrics.csv'} has the losses before it)" in r.stderr
    assert len((tmp_path / "r" / "metrics.csv").read_text().splitlines()) == 1 + 4


@pytest.mark.parametrize("every, premade, needle", [
    (100, False, "before the first checkpoint: nothing saved; removed the new run folder"),
    (100, True, "before the first checkpoint: nothing saved; emptied {run} again"),
    (2, False, "unsaved since step 2; resume with: gantk train --resume {last} --max-steps 50"),
])
def test_a_second_signal_stops_at_once_and_says_what_was_saved(tmp_path, monkeypatch, every, premade, needle):
    original = Trainer.train_step

    def step(self, x, **kw):
        if self.step == 3:
            raise KeyboardInterrupt  # what the signal handler raises on a second signal
        return original(self, x, **kw)

    monkeypatch.setattr(Trainer, "train_step", step)
    run = tmp_path / "r"
    if premade:  # the user's own empty folder stays, emptied of what training wrote
        run.mkdir()
    r = run_cli("train", "--data", "synthetic", "--data-count", "320", "--arch", "seed", "--max-steps", "50",
                "--checkpoint-every", str(every), "--runs-dir", str(tmp_path), "--run", "r")
    assert r.exit_code == 130 and needle.format(last=run / "checkpoints" / "last.pt", run=run) in r.stderr, r.output
    assert run.exists() == (every == 2 or premade)
    if premade:
        assert list(run.iterdir()) == []


def test_a_second_signal_with_only_best_pt_names_it(tmp_path):
    from types import SimpleNamespace

    from gantk.train import RunFolder, _unsaved

    run = RunFolder(tmp_path / "r")
    run.checkpoints.mkdir(parents=True)
    run.best.write_bytes(b"state")
    t = SimpleNamespace(step=12, config=TrainConfig(max_steps=40), world=SimpleNamespace(size=1))
    msg = _unsaved(t, run, "folder")
    assert msg.endswith(f"before the first last.pt: only {run.best} (the best FID so far) was saved; resume "
                        f"from it with: gantk train --resume {run.best} --max-steps 40")
    assert run.best.exists()


def test_a_signal_while_the_run_starts_still_saves_a_checkpoint(tmp_path):
    """The run folder exists from here on: a stop must leave it resumable by the same command."""
    def progress(event):
        if event["event"] == "start":
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match="stopped at step 1; resume with: gantk train --resume"):
        train(tiny(max_steps=6, log_every=1), runs_dir=tmp_path, run_dir=tmp_path / "r", progress=progress)
    assert ckpt.load(tmp_path / "r" / "checkpoints" / "last.pt")["step"] == 1
    assert (tmp_path / "r" / "samples" / "latest.png").is_file() and (tmp_path / "r" / "loss.png").is_file()
    assert train(tiny(max_steps=6, log_every=1), resume=tmp_path / "r" / "checkpoints" / "last.pt")["steps"] == 6


def test_the_resume_command_of_a_torchrun_run_is_a_torchrun_launch(monkeypatch):
    """Pasted as printed, a resume of a 2-process run must run 2 processes (exact resume needs them)."""
    from gantk.train import resume_command

    last, cfg = Path("r/a/checkpoints/last.pt"), TrainConfig(max_steps=20)
    assert resume_command(last, cfg) == "gantk train --resume r/a/checkpoints/last.pt --max-steps 20"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command(last, cfg, world_size=2) == \
        "torchrun --nproc-per-node 2 -m gantk -- train --resume r/a/checkpoints/last.pt --max-steps 20"
    assert resume_command(last, cfg, world_size=4).startswith("torchrun <the same launch options> -m gantk -- train")


def test_resuming_a_finished_run_trains_nothing_and_touches_nothing(tmp_path, trained_run):
    before = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*")}
    step = ckpt.load(trained_run / "checkpoints" / "last.pt")["step"]
    for extra in ([], ["--run", "fork", "--runs-dir", str(tmp_path)], ["--max-steps", "1"]):
        r = run_cli("train", "--resume", str(trained_run), *extra)
        assert r.exit_code == 0, r.output
        assert f"nothing to train: {trained_run / 'checkpoints' / 'last.pt'} is at step {step}" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in trained_run.rglob("*")} == before
    assert not (tmp_path / "fork").exists()
    digits = tmp_path / "digits.npy"
    np.save(digits, data.synthetic(64).images)
    s = train(tiny(data=str(digits), data_count=None, epochs=1), runs_dir=tmp_path)
    digits.unlink()  # gone, as MNIST is offline: a finished run needs no data to say so
    r = run_cli("train", "--resume", s["run_dir"])
    assert r.exit_code == 0 and "nothing to train" in r.stderr, r.output


def test_divergence_raises_in_the_library(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_loss", lambda self, logits, t: logits.sum() * float("inf"))
    with pytest.raises(DivergedError):
        train(tiny(), runs_dir=tmp_path)


# ------------------------------------------------------------------ signals (real processes)


def _start(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gantk", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_rows(metrics: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            return
        time.sleep(0.05)
    raise AssertionError(f"training never logged: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_then_exits_and_resume_matches_a_straight_run(tmp_path, default_signals, sig, code):
    """SIGTERM as a scheduler sends it, to the whole job, data-loader workers included."""
    args = ["train", "--data", "synthetic", "--data-count", "640", "--arch", "seed", "--epochs", "40",
            "--max-steps", "60", "--log-every", "1", "--sample-every", "100", "--runs-dir", "runs"]
    job = sig == signal.SIGTERM
    if job:
        args += ["--workers", "2"]
    proc = _start([*args, "--run", "cut"], tmp_path, start_new_session=job, preexec_fn=default_signals)
    _wait_for_rows(tmp_path / "runs" / "cut" / "metrics.csv", proc)
    if job:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.count("saving at the next step boundary") == 1, err  # the workers stay quiet
    assert "resume with: gantk train --resume runs/cut/checkpoints/last.pt --max-steps 60" in err
    stopped = ckpt.load(tmp_path / "runs" / "cut" / "checkpoints" / "last.pt")
    assert 0 < stopped["step"] < 60, "the signal arrived after training ended; the test proves nothing"
    for p in (["train", "--resume", "runs/cut", "--max-steps", "60"], [*args, "--run", "straight"]):
        proc = _start(p, tmp_path)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    a = ckpt.load(tmp_path / "runs" / "cut" / "checkpoints" / "last.pt")
    b = ckpt.load(tmp_path / "runs" / "straight" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 60 and weights_equal(a, b)
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "runs" / "cut" / "metrics.csv"))]
    assert steps == list(range(1, 61))


def test_a_signal_ignored_at_start_stays_ignored(tmp_path):
    """A job put in the background by a script or run under nohup starts with SIGINT ignored."""
    def ignore_sigint():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    proc = _start(["train", "--data", "synthetic", "--data-count", "320", "--arch", "seed", "--max-steps", "30",
                   "--log-every", "1", "--runs-dir", "runs", "--run", "bg"], tmp_path, preexec_fn=ignore_sigint)
    _wait_for_rows(tmp_path / "runs" / "bg" / "metrics.csv", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "saving at the next step boundary" not in err, err
    assert ckpt.load(tmp_path / "runs" / "bg" / "checkpoints" / "last.pt")["step"] == 30


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args,needle", [
    (["--data", "/no/such/file.gz"], "data path not found: /no/such/file.gz"),
    (["--data", "mnist"], "use --data synthetic"),
    (["--resume", "/no/such/run.pt"], "checkpoint not found: /no/such/run.pt"),
    (["--resume", "."], "is a folder without a checkpoint"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--batch-size", "0"], "batch-size must be at least 1"),
    (["--label-smoothing", "0.2"], "label-smoothing"),
    (["--betas", "1.5", "0.9"], "betas must be in [0, 1)"),
    (["--data-count", "-5"], "data-count must be at least 1"),
    (["--run", "../elsewhere"], "--run is a folder name under --runs-dir"),
    (["-q", "-v"], "-q and -v contradict"),
    (["--lr", "nan"], "learning rates must be positive and finite"),
    (["--lr-d", "0"], "learning rates must be positive and finite, got 0.0002 (G) 0 (D)"),  # 0 is no default
    (["--ema", "1.5"], "--ema must be in [0, 1), got 1.5"),
    (["--data-count", str(10**12)], "1,000,000,000,000 synthetic digits need about 6,144,000.0 GB in memory"),
])
def test_bad_input_is_exit_2_with_one_line(tmp_path, offline, args, needle):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = run_cli("train", "--data-count", "64", "--runs-dir", str(tmp_path), *(["--data", "synthetic"] if
                "--data" not in args else []), *args)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) <= 2


@pytest.fixture
def offline(monkeypatch):
    """MNIST downloads fail as they do here, also on a machine with internet (no hang, no 30 epochs)."""
    from urllib.error import URLError

    import torchvision.datasets.mnist

    def refuse(url, **kw):
        raise URLError("offline")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", refuse)


def test_offline_mnist_leaves_no_empty_cache_folder(tmp_path, offline):
    r = run_cli("train", "--runs-dir", str(tmp_path / "runs"), "--max-steps", "1")
    assert r.exit_code == 2 and "use --data synthetic" in r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_adds_the_traceback_before_or_after_the_command_and_keeps_the_exit_code(tmp_path, where):
    args = ["info", str(tmp_path / "nope.pt")]
    r = run_cli(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert r.exit_code == 2 and "Traceback" in r.stderr and "CheckpointError: not found" in r.stderr
    r = run_cli(*args)
    assert r.exit_code == 2 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["generate", "--fromat", "npy"], "No such option '--fromat'"), (["bogus"], "No such command 'bogus'"),
    (["info"], "Missing argument 'PATH'"), (["train", "--arch", "big"], "'big' is not one of"),
    (["export", "--opset", "x"], "'x' is not a valid integer"), (["classifier", "tain"], "No such command 'tain'"),
    (["--debug"], "Missing command"), (["classifier", "--debug"], "Missing command"),
])
def test_usage_errors_of_any_command_are_one_line_exit_2(args, needle):
    r = run_cli(*args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("gantk: error: ") and needle in r.stderr and len(r.stderr.splitlines()) == 1
    assert "--help'" in r.stderr


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncated", "foreign", "pickle", "function",
                                     "torchscript", "damaged", "damaged header"])
def test_bad_checkpoints_are_exit_2_naming_the_file(tmp_path, trained_run, damage, content):
    bad = tmp_path / "bad.pt"
    if content in ("damaged", "damaged header"):  # "damaged": torch.load would read it, one weight changed
        damage(trained_run / "checkpoints" / "last.pt", bad, "header" if content == "damaged header" else "data")
    elif content == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(bad))
    elif content == "truncated":
        bad.write_bytes((trained_run / "checkpoints" / "last.pt").read_bytes()[:5000])
    elif content == "foreign":
        torch.save({"state_dict": {}}, bad)
    elif content == "pickle":
        torch.save({"kind": "gantk-checkpoint", "x": Path("/")}, bad)
    elif content == "function":  # a reference to os.system: torch words its refusal differently
        torch.save({"kind": "gantk-checkpoint", "x": os.system}, bad)
    else:
        bad.write_bytes(content)
    r = run_cli("train", "--resume", str(bad), "--runs-dir", str(tmp_path))
    assert r.exit_code == 2, r.output
    assert str(bad) in r.stderr and len(r.stderr.splitlines()) == 1
    if content == "torchscript":
        assert "is a TorchScript file, not a gantk checkpoint" in r.stderr
    if content in ("pickle", "function"):
        assert "it holds " in r.stderr and "which weights_only=True loading refuses" in r.stderr
    if content == "damaged":
        assert "a damaged gantk checkpoint (data/" in r.stderr and "does not match the CRC-32" in r.stderr
    if content == "damaged header":
        assert "a damaged gantk checkpoint (a PyTorch zip cut short or corrupt" in r.stderr


def test_a_checkpoint_saved_without_crcs_loads(tmp_path, trained_run):
    """torch's set_crc32_options(False) writes CRC 0: nothing to check, not damage."""
    state = ckpt.load(trained_run / "checkpoints" / "last.pt")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, tmp_path / "plain.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert ckpt.load(tmp_path / "plain.pt")["step"] == state["step"]


def test_a_damaged_last_pt_names_the_newest_intact_checkpoint_which_resumes_in_place(tmp_path, damage):
    run_cli("train", "--data", "synthetic", "--data-count", "128", "--arch", "seed", "--epochs", "3",
            "--checkpoint-every", "2", "--runs-dir", str(tmp_path), "--run", "a", "-q")
    folder = tmp_path / "a" / "checkpoints"
    damage(folder / "last.pt", folder / "last.pt", "header")
    damage(folder / "step-00000012.pt", folder / "step-00000012.pt")
    r = run_cli("train", "--resume", "auto", "--runs-dir", str(tmp_path), "--epochs", "4")
    assert r.exit_code == 2 and "a damaged gantk checkpoint" in r.stderr, r.output
    intact = folder / "step-00000010.pt"
    assert r.stderr.rstrip().endswith(f"the newest intact checkpoint beside it: --resume {intact}")
    r = run_cli("train", "--resume", str(intact), "--runs-dir", str(tmp_path), "--epochs", "4", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["steps"] == 16, r.output
    assert "a damaged gantk checkpoint" in r.stderr and "replaces it" in r.stderr  # the damaged last.pt
    (folder / "last.pt").write_bytes(b"")
    r = run_cli("train", "--resume", str(tmp_path / "a"), "--runs-dir", str(tmp_path), "--epochs", "5")
    assert r.exit_code == 2 and f"the newest intact checkpoint beside it: --resume {folder / 'step-00000016.pt'}" \
        in r.stderr, r.output
    (folder / "last.pt").unlink()
    r = run_cli("train", "--resume", str(tmp_path / "a"), "--runs-dir", str(tmp_path), "--epochs", "5")
    assert r.exit_code == 2 and "its checkpoints/last.pt is missing; pass one of its checkpoints instead (" \
        "step-00000012.pt, step-00000014.pt, step-00000016.pt)" in r.stderr, r.output


def test_resuming_a_run_from_an_older_checkpoint_in_place_is_refused_and_branches_with_run(tmp_path):
    run_cli("train", "--data", "synthetic", "--data-count", "128", "--arch", "seed", "--epochs", "3",
            "--checkpoint-every", "2", "--runs-dir", str(tmp_path), "--run", "a", "-q")
    run = tmp_path / "a"
    before = {p.name: p.read_bytes() for p in [run / "metrics.csv", *(run / "checkpoints").iterdir()]}
    old = run / "checkpoints" / "step-00000010.pt"
    r = run_cli("train", "--resume", str(old), "--runs-dir", str(tmp_path))
    assert r.exit_code == 2 and "is at step 10, behind" in r.stderr and "pass --run NAME" in r.stderr, r.output
    assert {p.name: p.read_bytes() for p in [run / "metrics.csv", *(run / "checkpoints").iterdir()]} == before
    r = run_cli("train", "--resume", str(old), "--runs-dir", str(tmp_path), "--run", "b", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["steps"] == 12, r.output
    r = run_cli("train", "--resume", str(old), "--runs-dir", str(tmp_path), "--run", "b")  # b is a run now
    assert r.exit_code == 2 and "holds another run" in r.stderr, r.output
    (run / "checkpoints" / "last.pt").write_bytes(b"")  # a damaged last.pt is no loss: the resume replaces it
    r = run_cli("train", "--resume", str(old), "--runs-dir", str(tmp_path))
    assert r.exit_code == 2 and "behind" in r.stderr and "step-00000012.pt (step 12)" in r.stderr, r.output
    newest = run / "checkpoints" / "step-00000012.pt"
    r = run_cli("train", "--resume", str(newest), "--runs-dir", str(tmp_path), "--epochs", "4", "--json")
    assert r.exit_code == 0 and "continuing from" in r.stderr and ckpt.load(run / "checkpoints" / "last.pt")["step"] == 16


def test_a_resume_into_another_runs_folder_without_last_pt_is_refused_and_keeps_its_files(tmp_path):
    """Numbered checkpoints alone, or a config.json of a run that stopped before its first save: another run."""
    src = Path(train(tiny(arch="dcgan", data_count=64, epochs=1), run_dir=tmp_path / "a")["run_dir"])
    resume = src / "checkpoints" / "last.pt"
    train(tiny(data_count=64, epochs=2), run_dir=tmp_path / "c")
    (tmp_path / "c" / "checkpoints" / "last.pt").unlink()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(tiny(data_count=64).to_dict()))  # seed, never saved
    (tmp_path / "d" / "metrics.csv").write_text("step\n1\n")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.json").write_text("[]")  # the user's own
    for other, held in (("c", "step-00000004.pt"), ("d", "its config.json has other .*arch")):
        before = {p.name: p.read_bytes() for p in (tmp_path / other).rglob("*") if p.is_file()}
        with pytest.raises(UsageError, match=f"{tmp_path / other} holds another run .*{held}"):
            train(tiny(arch="dcgan", data_count=64, epochs=3), resume=resume, run_dir=tmp_path / other)
        assert {p.name: p.read_bytes() for p in (tmp_path / other).rglob("*") if p.is_file()} == before
    with pytest.raises(UsageError, match=f"{tmp_path / 'f'} holds a config.json that is not this run's"):
        train(tiny(arch="dcgan", data_count=64, epochs=3), resume=resume, run_dir=tmp_path / "f")
    # the same resume's own earlier try, stopped before its first save, continues where it left its folder
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps(ckpt.load(resume)["config"]))
    s = train(tiny(arch="dcgan", data_count=64, epochs=2), resume=resume, run_dir=tmp_path / "e")
    assert s["steps"] == 4 and ckpt.load(tmp_path / "e" / "checkpoints" / "last.pt")["step"] == 4


def test_a_resume_behind_a_numbered_checkpoint_of_its_own_run_is_refused_where_last_pt_is_gone(tmp_path):
    run = Path(train(tiny(data_count=64, epochs=3), run_dir=tmp_path / "a")["run_dir"])
    (run / "checkpoints" / "last.pt").unlink()
    with pytest.raises(UsageError, match=r"step-00000004.pt is at step 4, behind .*step-00000006.pt \(step 6\)"):
        train(tiny(data_count=64, epochs=3), resume=run / "checkpoints" / "step-00000004.pt")


def test_existing_run_folder_is_never_overwritten(tmp_path, trained_run):
    before = (trained_run / "checkpoints" / "last.pt").read_bytes()
    r = run_cli("train", "--data", "synthetic", "--data-count", "64", "--runs-dir", str(trained_run.parent),
                "--run", trained_run.name)
    assert r.exit_code == 2 and "--resume" in r.stderr
    assert (trained_run / "checkpoints" / "last.pt").read_bytes() == before


def test_doctor_reports_versions_and_providers():
    r = run_cli("doctor", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["torch"].startswith("2.") and "CPUExecutionProvider" in doc["onnxruntime providers"]
    assert doc["gantk runs on"].startswith("cuda" if torch.cuda.is_available() else "cpu (no usable CUDA device")


# ------------------------------------------------------------------ CUDA


@pytest.mark.gpu
def test_cuda_training_resumes_exactly(tmp_path):
    cfg = tiny(device="cuda", epochs=3)
    straight = train(cfg, runs_dir=tmp_path / "a")
    first = train(cfg.replace(max_steps=5), runs_dir=tmp_path / "b")
    resumed = train(cfg, resume=Path(first["checkpoint"]))
    assert straight["device"] == "cuda" and resumed["steps"] == 9
    a, b = ckpt.load(straight["checkpoint"]), ckpt.load(resumed["checkpoint"])
    for n in a["generator"]:
        assert torch.allclose(a["generator"][n], b["generator"][n], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["logits", "bce"])
def test_cuda_amp_trains(tmp_path, loss):
    s = train(tiny(device="cuda", amp=True, max_steps=4, loss=loss), runs_dir=tmp_path)
    assert s["steps"] == 4 and ckpt.load(s["checkpoint"])["scaler"] is not None


def test_the_tutorial_bce_loss_runs_outside_autocast(tmp_path, monkeypatch):
    """CUDA's autocast refuses BCELoss (an error at the first step of `--recipe tutorial --amp` there);
    the CPU's allows it, so this asserts where it runs."""
    import torch.nn.functional as F

    bce, seen = F.binary_cross_entropy, []

    def watched(*a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return bce(*a, **k)

    monkeypatch.setattr(F, "binary_cross_entropy", watched)
    train(tiny(loss="bce", amp=True, max_steps=2), runs_dir=tmp_path)
    assert seen and not any(seen)


def test_resume_rewrites_a_metrics_file_with_older_columns(tmp_path):
    """A run started by an older gantk (fewer metric columns) resumes into a well-formed metrics.csv."""
    from gantk.train import METRICS

    first = train(tiny(max_steps=4), runs_dir=tmp_path)
    path = Path(first["run_dir"]) / "metrics.csv"
    rows = list(csv.DictReader(open(path)))
    old = [c for c in METRICS if c != "recognised"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, old, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    train(tiny(), resume=Path(first["checkpoint"]))
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == METRICS and all(len(r) == len(METRICS) for r in table)
    assert [int(r[0]) for r in table[1:]] == [2, 4, 6]

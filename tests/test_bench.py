"""The fast inference routes (channels_last fp32/bf16, torch-bf16 in generate) and `gantk bench`.

Parity tests fail when a rewrite is wrong (a broken BatchNorm fold is patched in to show it); nothing
here asserts a timing: the bench is checked for its shape and its parity figures only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gantk import bench as bench_mod
from gantk.cli import cli
from gantk.errors import VerificationError
from gantk.exporters import fold
from gantk.exporters.validate import TOLERANCE, compare, fixed_noise
from gantk.generate import Request, generate, to_pixels
from gantk.models import build


def _generator(arch: str):
    """A fresh generator with BatchNorm statistics far from (0, 1), so a wrong fold shows."""
    torch.manual_seed(0)
    g, _ = build(arch)
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.2, 0.2)
    return g.eval()


def _runner(module):
    def run(z):
        with torch.inference_mode():
            return module(torch.from_numpy(z)).numpy()

    return run


def _wrong_merge(conv, bn):
    """BatchNorm folded without its shift: the kind of slip the parity checks must catch."""
    merged = _right_merge(conv, bn)
    merged.bias = torch.nn.Parameter(torch.zeros_like(merged.bias), requires_grad=False)
    return merged


_right_merge = fold._merge


@pytest.mark.parametrize("arch", ["seed", "dcgan"])
def test_channels_last_fp32_matches_eager_at_every_batch_size(arch):
    g = _generator(arch)
    parity = compare(_runner(fold.channels_last(g, dtype="fp32")), g, atol=TOLERANCE["fp32"])
    assert parity.ok and parity.pixels_off < 1e-3 and parity.batch_consistency < 1e-5


@pytest.mark.parametrize("arch", ["seed", "dcgan"])
def test_bf16_every_pixel_within_one_level(arch):
    g = _generator(arch)
    run = _runner(fold.channels_last(g, dtype="bf16"))
    z = fixed_noise(g.latent_shape, count=64)
    with torch.inference_mode():
        ref = g(torch.from_numpy(z)).numpy()
    levels = np.abs(to_pixels(run(z)).astype(int) - to_pixels(ref).astype(int))
    assert levels.max() <= 1 and 0 < np.abs(run(z) - ref).max() <= TOLERANCE["bf16"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_wrong_fold_fails_parity(dtype, monkeypatch):
    g = _generator("dcgan")
    monkeypatch.setattr(fold, "_merge", _wrong_merge)
    parity = compare(_runner(fold.channels_last(g, dtype=dtype)), g, atol=TOLERANCE[dtype])
    assert not parity.ok


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> Path:
    return trained_run / "checkpoints" / "last.pt"


def _npy(out: Path) -> np.ndarray:
    return np.load(next(out.glob("images-*.npy")))


def test_generate_torch_bf16_parity_and_batch_independence(checkpoint, tmp_path):
    runs = {bs: generate(Request(out=tmp_path / f"b{bs}", count=70, fmt="npy", batch_size=bs), model=checkpoint,
                         backend="torch-bf16", provider="cpu") for bs in (1, 64)}
    assert runs[64]["parity"]["status"] == "passed" and runs[64]["parity"]["atol"] == TOLERANCE["bf16"]
    np.testing.assert_array_equal(_npy(tmp_path / "b1"), _npy(tmp_path / "b64"))
    generate(Request(out=tmp_path / "fp32", count=70, fmt="npy"), model=checkpoint, backend="torch", provider="cpu")
    levels = np.abs(_npy(tmp_path / "b64").astype(int) - _npy(tmp_path / "fp32").astype(int))
    assert levels.max() <= 1


def test_generate_torch_bf16_wrong_fold_exit_4_before_writing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(fold, "_merge", _wrong_merge)
    with pytest.raises(VerificationError, match="parity failed"):
        generate(Request(out=tmp_path / "out", count=20), model=checkpoint, backend="torch-bf16", provider="cpu")
    assert not list((tmp_path / "out").glob("*.png"))


def test_bench_cli_json_rows_parity_and_targets(checkpoint, monkeypatch):
    monkeypatch.setattr(bench_mod, "MIN_IMAGES", 8)
    monkeypatch.setattr(bench_mod, "MATMUL_N", 128)
    args = ["bench", "--checkpoint", str(checkpoint), "--batch-sizes", "1,8", "--repeats", "1", "--count", "24",
            "--threads", "1", "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    routes = {(r["route"], r["precision"]) for r in doc["rows"]}
    assert {("torch eager", "fp32"), ("torch folded+cl", "fp32"), ("torch-bf16", "bf16"), ("torchscript", "fp32"),
            ("onnxruntime", "fp32"), ("onnxruntime", "fp16")} <= routes
    assert len(doc["rows"]) == 2 * len(routes) and all(r["images_per_s"] > 0 for r in doc["rows"])
    for r in doc["rows"]:
        bound = {"fp32": (TOLERANCE["fp32"], 0), "bf16": (TOLERANCE["bf16"], 1), "fp16": (TOLERANCE["fp16"], 2)}
        atol, levels = bound[r["precision"]]
        assert r["max_abs_diff"] <= atol and r["max_levels_off"] <= levels, r
    assert [e["backend"] for e in doc["end_to_end"]][:2] == ["seed-style baseline", "onnxruntime"]
    assert all(e["parity"] in ("passed", "n/a") for e in doc["end_to_end"])
    assert doc["targets"]["default_e2e_vs_baseline"] > 0 and doc["peaks_gflops"]["fp32@1"] > 0
    assert "target fastest fp32" in bench_mod.format_table(doc)


@pytest.mark.parametrize("args", [["--batch-sizes", "0,8"], ["--batch-sizes", "a"], ["--repeats", "0"],
                                  ["--threads", "0"]])
def test_bench_bad_input_exit_2(args, tmp_path):
    res = CliRunner().invoke(cli, ["bench", "--runs-dir", str(tmp_path), *args])
    assert res.exit_code == 2, res.output

"""The fast eager routes (BatchNorm folded, channels_last, fp32 and bf16) and `gantk bench`.

Parity tests fail when a rewrite is wrong (a broken BatchNorm fold is patched in to show it); nothing
here asserts a timing: the bench is checked for its shape and its parity figures only.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gantk import bench as bench_mod
from gantk.backends import MAX_STREAMS, cores, native_bf16
from gantk.cli import cli
from gantk.exporters import fold
from gantk.exporters.validate import TOLERANCE, compare
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
BF16_ATOL = TOLERANCE["fp16"]


@pytest.mark.parametrize("arch", ["seed", "dcgan"])
def test_channels_last_fp32_matches_eager_at_every_batch_size(arch):
    g = _generator(arch)
    parity = compare(_runner(fold.channels_last(g, dtype="fp32")), g, atol=TOLERANCE["fp32"])
    assert parity.ok and parity.pixels_off < 1e-3 and parity.batch_consistency < 1e-5


@pytest.mark.parametrize("arch", ["seed", "dcgan"])
def test_bf16_route_close_to_eager(arch):
    """The bench's bf16 route: rounded (not exact), yet within fp16's bound on a fresh generator."""
    g = _generator(arch)
    parity = compare(_runner(fold.channels_last(g, dtype="bf16")), g, atol=BF16_ATOL)
    assert parity.ok and parity.max_abs_diff > 0 and parity.batch_consistency < BF16_ATOL


@pytest.mark.parametrize("arch", ["seed", "dcgan"])
def test_bf16_route_keeps_the_noise_projection_in_fp32(arch):
    """In bf16 the first layer alone moved a trained model's pixels by 8 levels (BENCHMARKS.md)."""
    m = fold.channels_last(_generator(arch), dtype="bf16")
    first = "Projection" if arch == "dcgan" else "ConvTranspose2d"  # the dcgan's 1x1 noise: a matmul
    assert [type(x).__name__ for x in m.head] == [first, "ReLU"]
    assert {p.dtype for p in m.head.parameters()} == {torch.float32}
    assert {p.dtype for p in m.body.parameters()} == {torch.bfloat16}
    assert len(m.head) + len(m.body) == len(fold.fold_batchnorm(_generator(arch)).net)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_wrong_fold_fails_parity(dtype, monkeypatch):
    g = _generator("dcgan")
    monkeypatch.setattr(fold, "_merge", _wrong_merge)
    atol = TOLERANCE["fp32"] if dtype == "fp32" else BF16_ATOL
    parity = compare(_runner(fold.channels_last(g, dtype=dtype)), g, atol=atol)
    assert not parity.ok


def test_a_route_beyond_its_tolerance_is_warned_about_once(caplog):
    from gantk.bench import _warn_off_parity

    row = dict(route="onnxruntime", precision="fp32", threads=1, pixels_off=0.92, max_abs_diff=0.3)
    rows = [{**row, "batch": 1, "streams": 1}, {**row, "batch": 64, "streams": 2},  # as _rows makes them
            {**row, "threads": 2, "batch": 64, "streams": 1},
            {**row, "precision": "fp16", "batch": 1, "streams": 1, "max_abs_diff": 5e-3}]  # within fp16's 1e-2
    with caplog.at_level(logging.WARNING, logger="gantk"):
        _warn_off_parity(rows)
    assert [r.getMessage() for r in caplog.records] == [
        "onnxruntime fp32: max abs diff 0.3 against eager fp32, beyond the fp32 tolerance 0.0001 (92.0% of pixels "
        "off): its figures are not this checkpoint's"]


def test_a_route_that_outputs_nan_shows_an_infinite_diff():
    from gantk.bench import parity

    ref = torch.zeros(2, 1, 32, 32).numpy()
    out = ref.copy()
    out[0, 0, 0, 0] = float("nan")
    assert parity(out, ref)["max_abs_diff"] == float("inf")


@pytest.mark.parametrize("transposed", [True, False])
def test_useful_flops_count_only_the_products_that_reach_the_output(transposed):
    import torch.nn.functional as F

    from gantk import models

    for k, stride, pad, n in [(4, 2, 1, 4), (4, 2, 1, 16), (5, 1, 0, 6), (5, 1, 2, 7), (3, 2, 1, 9)]:
        x, w = torch.ones(1, 1, n, n), torch.ones(1, 1, k, k)  # each output sums the products that reach it
        y = (F.conv_transpose2d if transposed else F.conv2d)(x, w, stride=stride, padding=pad)
        assert models._taps(n, y.shape[-1], k, stride, pad, transposed=transposed) ** 2 == y.sum()
    seed, dcgan = models.flops_per_image(models.seed_generator()), models.flops_per_image(models.dcgan_generator())
    assert round(seed["useful"] / 1e6, 1) == 73.8 and round(seed["padded"] / 1e6, 1) == 132.3  # the 74, 132
    assert round(dcgan["useful"] / 1e6, 1) == 28.9  # 34.9 if the taps the padding crops were counted


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> Path:
    return trained_run / "checkpoints" / "last.pt"


def test_a_stopped_bench_does_not_pass_on_generates_advice_for_its_temp_folder(checkpoint, monkeypatch):
    from gantk.errors import Interrupted

    def stopped(ckpt, onnx, work, **kw):
        raise Interrupted(f"interrupted: 0 of 6000 images are in {work / 'e2e-t1-0'}; the same command writes "
                          "the rest", 15)

    monkeypatch.setattr(bench_mod, "_measure", stopped)
    r = CliRunner().invoke(cli, ["bench", "--checkpoint", str(checkpoint)])
    assert r.exit_code == 143 and r.stderr.strip().splitlines()[-1] == \
        "gantk: interrupted: the bench keeps nothing (its exports and images were temporary)", r.output


def test_bench_cli_json_rows_parity_and_targets(checkpoint, monkeypatch):
    monkeypatch.setattr(bench_mod, "MIN_IMAGES", 8)
    monkeypatch.setattr(bench_mod, "MATMUL_N", 128)
    args = ["bench", "--checkpoint", str(checkpoint), "--batch-sizes", "1,256", "--repeats", "1", "--count", "24",
            "--threads", "1,1", "--json"]  # 256: generate's batch, so the end-to-end rows have pure rows to match
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    routes = {(r["route"], r["precision"], r["streams"]) for r in doc["rows"]}
    streams = {("onnxruntime", "fp32", min(cores(), MAX_STREAMS))} if cores() > 1 else set()
    bf16 = {("torch-bf16", "bf16", 1)} if native_bf16() else set()  # emulated bf16 is left out
    assert {("torch eager", "fp32", 1), ("torch folded+cl", "fp32", 1), ("torchscript", "fp32", 1),
            ("onnxruntime", "fp32", 1), ("onnxruntime", "fp16", 1)} | streams | bf16 == routes
    assert len(doc["rows"]) == 2 * len(routes) and all(r["images_per_s"] > 0 for r in doc["rows"])
    assert all(r["peak_share"] > 0 for r in doc["rows"])  # the streams' peak is timed at all their threads
    for r in doc["rows"]:
        atol = {"fp32": TOLERANCE["fp32"], "bf16": BF16_ATOL, "fp16": TOLERANCE["fp16"]}[r["precision"]]
        assert r["max_abs_diff"] <= atol, r
    assert [e["backend"] for e in doc["end_to_end"]][:2] == ["seed-style baseline", "onnxruntime"]
    assert all(e["parity"] in ("passed", "n/a") and len(e["runs"]) == 1 for e in doc["end_to_end"])
    assert doc["targets"]["default_e2e_vs_baseline"] > 0 and doc["peaks_gflops"]["fp32@1"] > 0
    others = doc["targets"]["other_png_plans"]  # 1 stream of 1 thread, beside the default 2 streams
    assert len(others) == (cores() > 1) and all(o["vs_baseline"] > 0 and o["vs_own_pure"] > 0 for o in others)
    assert doc["targets"]["default_e2e_vs_own_pure"] > 0
    assert all(e["cpu_s"] > 0 and e["cores"] == cores() for e in doc["end_to_end"])
    cpu = doc["targets"]["default_cpu"]
    assert cpu["core_us_per_image"] > cpu["workers_core_us_per_image"] > 0 and 0 < cpu["busy"]
    assert all(r["core_us_per_image"] > 0 for r in doc["rows"])  # measured, not threads x streams / rate
    assert cpu["pure_inference_core_us_per_image"] in {r["core_us_per_image"] for r in doc["rows"]}
    assert "its CPU:" in bench_mod.format_table(doc)
    low = doc["targets"]["fastest_reduced_precision"]
    assert not native_bf16() or (low["bf16_png_e2e_vs_baseline"] > 0 and low["bf16_npy_e2e_vs_baseline"] > 0)
    assert "target fastest fp32" in bench_mod.format_table(doc)
    assert ("other onnxruntime PNG plan 1:" in bench_mod.format_table(doc)) == (cores() > 1)


def test_bench_rows_are_generates_defaults_on_a_bigger_machine(monkeypatch):
    """On 4 cores generate runs 3 streams of 1 thread for PNGs, 4 for npy: the rows the targets read."""
    from gantk import backends

    monkeypatch.setattr(backends, "cores", lambda: 4)
    routes = bench_mod.cpu_paths(_generator("dcgan"), {k: Path(k) for k in ("onnx", "torchscript", "onnx-fp16")},
                                 threads=[3, 1, 4])
    ort = {(r.threads, r.streams): r.note for r in routes if (r.name, r.precision) == ("onnxruntime", "fp32")}
    assert set(ort) == {(3, 1), (1, 1), (4, 1), (1, 3), (1, 4)}
    assert ort[(1, 3)].endswith("; generate default") and ort[(1, 4)].endswith("; generate default for npy")
    assert not any("default" in ort[p] for p in [(3, 1), (1, 1), (4, 1)])


def test_no_bf16_rows_where_bf16_would_be_emulated(checkpoint, tmp_path, monkeypatch):
    """Without AVX512-BF16/AMX bf16 runs 3-80x slower than fp32: the bench leaves it out."""
    from gantk import backends
    from gantk.checkpoint import generator_from, load

    monkeypatch.setattr(backends, "native_bf16", lambda: False)
    files = bench_mod._exports(checkpoint, None, tmp_path)
    assert "torchscript-bf16" not in files and not list(tmp_path.glob("*bf16*"))
    routes = bench_mod.cpu_paths(generator_from(load(checkpoint)).eval(), files, threads=[1])
    assert all(r.precision != "bf16" for r in routes)


@pytest.mark.parametrize("args", [["--batch-sizes", "0,8"], ["--batch-sizes", "a"], ["--repeats", "0"],
                                  ["--threads", "0"], ["--gpu-batch-sizes", "0,4"], ["--gpu-count", "-1"]])
def test_bench_bad_input_exit_2(args, tmp_path):
    res = CliRunner().invoke(cli, ["bench", "--runs-dir", str(tmp_path), *args])
    assert res.exit_code == 2 and args[0] in res.stderr, res.output  # the message names the option


def test_bench_inputs_resolve_a_run_folder_and_refuse_a_model_of_another_checkpoint(trained_run, tmp_path):
    from gantk.errors import UsageError
    from gantk.exporters import EXPORTERS

    onnx, ts = tmp_path / "g.onnx", tmp_path / "g.pt"
    EXPORTERS["onnx"](trained_run / "checkpoints" / "last.pt", onnx)
    EXPORTERS["torchscript"](trained_run / "checkpoints" / "last.pt", ts)
    ckpt, model = bench_mod.resolve_inputs(model=onnx, checkpoint=trained_run, runs_dir=tmp_path)
    assert ckpt == trained_run / "checkpoints" / "last.pt" and model == onnx
    other = tmp_path / "other.pt"
    other.write_bytes(ckpt.read_bytes() + b"\0")  # another file (the zip reader ignores a trailing byte)
    with pytest.raises(UsageError, match="was exported from a checkpoint of sha256 .*, which .* no longer is"):
        bench_mod.resolve_inputs(model=onnx, checkpoint=other, runs_dir=tmp_path)
    with pytest.raises(UsageError, match="bench takes an ONNX export"):
        bench_mod.resolve_inputs(model=ts, checkpoint=ckpt, runs_dir=tmp_path)
    run = tmp_path / "runs" / "00000-seed-synthetic"  # the newest run's export, then more training
    (run / "export").mkdir(parents=True)
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints")
    shutil.copy(onnx, run / "export" / "generator.onnx")
    assert bench_mod.resolve_inputs(model=None, checkpoint=None, runs_dir=tmp_path / "runs")[1] == \
        run / "export" / "generator.onnx"
    shutil.copy(other, run / "checkpoints" / "last.pt")
    assert bench_mod.resolve_inputs(model=None, checkpoint=None, runs_dir=tmp_path / "runs")[1] is None  # stale
    shutil.copy(ckpt, run / "checkpoints" / "last.pt")
    EXPORTERS["onnx"](run / "checkpoints" / "last.pt", tmp_path / "run.onnx")
    shutil.copy(other, run / "checkpoints" / "last.pt")  # trained on since: its numbered copy is the source
    found = bench_mod.resolve_inputs(model=tmp_path / "run.onnx", checkpoint=None, runs_dir=tmp_path)[0]
    assert found.parent == run / "checkpoints" and found.name.startswith("step-"), found


def test_gpu_section_runs_on_the_cpu_with_parity(checkpoint, tmp_path):
    """bench_gpu's device-resident timing, peaks and parity, run on the CPU (the CUDA rows need a GPU)."""
    from gantk import bench_gpu
    from gantk.checkpoint import generator_from, load

    g = generator_from(load(checkpoint)).eval()
    sec = bench_gpu.gpu_section(g, {}, device="cpu", batch_sizes=(4, 16), repeats=2, min_seconds=0.01, peak_n=64)
    routes = {(r["route"], r["precision"]) for r in sec["rows"]}
    assert routes == {("torch eager", "fp32"), ("torch folded+cl", "fp32"), ("torch folded+cl", "bf16")}
    assert len(sec["rows"]) == 2 * len(routes) and all(r["images_per_s"] > 0 for r in sec["rows"])
    for r in sec["rows"]:
        assert r["max_abs_diff"] <= (TOLERANCE["fp32"] if r["precision"] == "fp32" else BF16_ATOL), r
    eager = [r for r in sec["rows"] if r["route"] == "torch eager"]
    assert all(r["max_abs_diff"] == 0 for r in eager)  # the same module on the same device as the reference
    assert sec["peaks_gflops"]["fp32"] > 0 and "torch folded+cl" in "\n".join(bench_gpu.format_gpu(sec))


def test_gpu_section_parity_catches_a_wrong_fold(checkpoint, monkeypatch):
    from gantk import bench_gpu
    from gantk.checkpoint import generator_from, load

    g = _generator("dcgan")
    monkeypatch.setattr(fold, "_merge", _wrong_merge)
    sec = bench_gpu.gpu_section(g, {}, device="cpu", batch_sizes=(8,), repeats=1, min_seconds=0.001, peak_n=32)
    folded = [r for r in sec["rows"] if r["route"] == "torch folded+cl" and r["precision"] == "fp32"]
    assert folded and folded[0]["max_abs_diff"] > TOLERANCE["fp32"]


@pytest.mark.gpu
def test_gpu_section_and_end_to_end_on_cuda(checkpoint, tmp_path):
    import onnxruntime as ort

    from gantk import bench as bench_mod
    from gantk import bench_gpu
    from gantk.checkpoint import generator_from, load

    g = generator_from(load(checkpoint)).eval()
    files = bench_mod._exports(checkpoint, None, tmp_path)
    sec = bench_gpu.gpu_section(g, files, batch_sizes=(64, 256), repeats=1, min_seconds=0.01, peak_n=1024)
    routes = {(r["route"], r["precision"]) for r in sec["rows"]}
    assert {("torch eager", "fp32"), ("torch eager", "tf32"), ("torch folded+cl", "fp16")} <= routes
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert ("onnxruntime cuda", "fp32") in routes
    for r in sec["rows"]:
        assert r["images_per_s"] > 0
        if r["precision"] == "fp32":  # TF32 off on every fp32 route
            assert r["max_abs_diff"] <= TOLERANCE["fp32"], r
        elif r["precision"] in ("tf32", "fp16"):
            assert r["max_abs_diff"] <= TOLERANCE["fp16"], r
    rows = bench_gpu.gpu_end_to_end(files, checkpoint, tmp_path, count=2500, batch_sizes=(256,), writers=(2,))
    parity = "passed" if "CUDAExecutionProvider" in ort.get_available_providers() else "not-applicable"
    assert [(r["format"], r["parity"]) for r in rows] == [("png", parity), ("npy", parity)]  # else torch backend
    assert all(r["provider"] == "cuda" and r["timing"]["inference"] > 0 for r in rows)
    assert sorted(p.name for p in tmp_path.glob("gpu-*")) == ["gpu-npy-w2-b256", "gpu-png-w2-b256"]  # kept till the end


def test_peak_envelope_never_below_the_peak_of_fewer_threads():
    peak = {("fp32", 1): 100.0, ("fp32", 2): 180.0, ("bf16", 1): 300.0, ("bf16", 2): 50.0, ("bf16", 4): 400.0}
    assert bench_mod.peak_envelope(peak) == {("fp32", 1): 100.0, ("fp32", 2): 180.0, ("bf16", 1): 300.0,
                                         ("bf16", 2): 300.0, ("bf16", 4): 400.0}

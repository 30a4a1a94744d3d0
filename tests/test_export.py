"""gantk export / gantk info: both formats export, validate and reload; validation catches what it should;
bad input gets the documented exit codes. API tests beside CLI tests (CliRunner, tmp_path)."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gantk.cli import cli
from gantk.exporters import EXPORTERS, Source, read_metadata
from gantk.exporters.base import META_KEYS
from gantk.exporters.validate import BATCH_SIZES, TOLERANCE, compare, eager, fixed_noise

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny seed-arch run (2 steps on 64 synthetic digits), shared by the module."""
    from gantk.config import TrainConfig
    from gantk.train import train

    runs = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(data="synthetic", data_count=64, arch="seed", epochs=1, max_steps=2, log_every=1)
    return Path(train(cfg, runs_dir=runs)["run_dir"])


@pytest.fixture(scope="module")
def ckpt(run_dir) -> Path:
    return run_dir / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def onnx_export(run_dir) -> tuple[Path, dict, str]:
    """`gantk export` with no --checkpoint and no --out: the newest run's last.pt, the default path."""
    r = CliRunner().invoke(cli, ["export", "--format", "onnx", "--runs-dir", str(run_dir.parent), "--json"])
    assert r.exit_code == 0, r.output
    return run_dir / "export" / "generator.onnx", json.loads(r.stdout), r.stderr


@pytest.fixture(scope="module")
def ts_export(ckpt, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ts") / "g.pt"
    r = CliRunner().invoke(cli, ["export", "--format", "torchscript", "--checkpoint", str(ckpt),
                                 "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def _eager(ckpt: Path, z: np.ndarray) -> np.ndarray:
    return eager(Source.from_checkpoint(ckpt).generator, z)


def _export(args: list[str]):
    return CliRunner().invoke(cli, ["export", *args])


# ------------------------------------------------------------------------------------------ ONNX


def test_onnx_default_paths_and_report(onnx_export, ckpt):
    path, report, stderr = onnx_export
    assert path.is_file() and report["path"] == str(path)
    assert str(ckpt) in stderr and "newest run" in stderr and str(path) in stderr
    assert report["batch_sizes"] == list(BATCH_SIZES) and report["opset"] == 20
    assert report["max_abs_diff"] <= TOLERANCE["fp32"] and report["pixels_off"] < 1e-3
    assert report["size_bytes"] == path.stat().st_size
    assert sorted(p.name for p in path.parent.iterdir()) == ["generator.onnx"]  # no external data, no temp left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_reading_the_umask_never_sets_it(monkeypatch):
    """Setting the umask to read it would leave it 0 for a moment: another thread's file world-writable."""
    from gantk.checkpoint import file_mode

    umask = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail(f"os.umask({mask:#o}) called"))
        assert file_mode() == 0o640
    finally:
        monkeypatch.undo()
        os.umask(umask)


def test_onnx_graph_contract(onnx_export, ckpt):
    import onnx

    path, _, _ = onnx_export
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert [i.name for i in m.graph.input] == ["z"] and [o.name for o in m.graph.output] == ["image"]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 6, 6]
    ops = {n.op_type for n in m.graph.node}
    assert "BatchNormalization" not in ops and "ConvTranspose" not in ops and "Conv" in ops  # seed: all stride 1
    assert all(not t.HasField("data_location") or t.data_location == 0 for t in m.graph.initializer)
    meta = {p.key: p.value for p in m.metadata_props}
    assert set(meta) == set(META_KEYS) and all(isinstance(v, str) for v in meta.values())
    assert meta["gantk_format"] == "1" and meta["kind"] == "gantk-generator" and meta["arch"] == "seed"
    assert json.loads(meta["latent_shape"]) == [1, 6, 6] and meta["output_range"] == "[-1, 1]"
    assert meta["source_checkpoint"] == str(ckpt.resolve()) and meta["step"] == "2"
    from gantk.checkpoint import sha256

    assert meta["source_sha256"] == sha256(ckpt) and "torch" in json.loads(meta["versions"])


def test_onnx_reloads_in_onnxruntime_and_reference_evaluator(onnx_export, ckpt):
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    path, _, _ = onnx_export
    z = fixed_noise((1, 6, 6), count=5)
    want = _eager(ckpt, z)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["image"], {"z": z})[0], want, atol=1e-4)
    ref = ReferenceEvaluator(str(path))
    np.testing.assert_allclose(ref.run(None, {"z": z[:3]})[0], want[:3], atol=1e-4)


def test_onnx_fp16_keeps_float32_edges(ckpt, tmp_path):
    import onnx

    out = tmp_path / "g16.onnx"
    r = _export(["--checkpoint", str(ckpt), "--out", str(out), "--dtype", "fp16", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["dtype"] == "fp16" and report["atol"] == TOLERANCE["fp16"]
    assert report["max_abs_diff"] <= TOLERANCE["fp16"]
    m = onnx.load(str(out))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.node[0].op_type == "Cast" and m.graph.node[-1].op_type == "Cast"
    assert {t.data_type for t in m.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert read_metadata(out)["dtype"] == "fp16"


def test_onnx_example_writes_png(onnx_export, tmp_path):
    png = tmp_path / "grid.png"
    script = EXAMPLES / "onnx_inference.py"
    p = subprocess.run([sys.executable, str(script), str(onnx_export[0]), "--count", "10", "--out", str(png)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    from PIL import Image

    assert Image.open(png).size == (4 * 34 + 2, 3 * 34 + 2)


# ------------------------------------------------------------------------------------------ TorchScript

FRESH = """
import json, sys, torch
extra = {"gantk.json": ""}
m = torch.jit.load(sys.argv[1], _extra_files=extra)
z = torch.load(sys.argv[2])
with torch.inference_mode():
    torch.save(m(z), sys.argv[3])
assert not [k for k in sys.modules if k.startswith(("gantk", "onnx"))]
print(extra["gantk.json"].decode())
"""


def test_torchscript_reloads_in_fresh_torch_only_process(ts_export, ckpt, tmp_path):
    import torch

    path, report = ts_export
    assert report["max_abs_diff"] <= TOLERANCE["fp32"] and report["opset"] is None
    z = fixed_noise((1, 6, 6), count=9)
    torch.save(torch.from_numpy(z), tmp_path / "z.pt")
    p = subprocess.run([sys.executable, "-c", FRESH, str(path), str(tmp_path / "z.pt"), str(tmp_path / "y.pt")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    meta = json.loads(p.stdout)
    assert set(meta) == set(META_KEYS) and meta["kind"] == "gantk-generator"
    np.testing.assert_allclose(torch.load(tmp_path / "y.pt").numpy(), _eager(ckpt, z), atol=1e-4)


def test_torchscript_is_frozen_and_example_runs(ts_export, tmp_path):
    info = json.loads(CliRunner().invoke(cli, ["info", str(ts_export[0]), "--json"]).stdout)
    assert info["kind"] == "torchscript" and info["frozen"] is True
    assert info["inputs"][0]["name"] == "z" and info["inputs"][0]["shape"] == ["N", 1, 6, 6]
    png = tmp_path / "grid.png"
    p = subprocess.run([sys.executable, str(EXAMPLES / "torchscript_inference.py"), str(ts_export[0]),
                        "--count", "7", "--out", str(png)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torchscript_exports_of_one_checkpoint_are_the_same_bytes(ckpt, tmp_path):
    """A re-export must not look like another model (generate's folder identity is the model's sha256).
    Each `gantk export` is a fresh process, as a user runs it (torch numbers scripted classes per process)."""
    for name in ("a.pt", "b.pt"):
        subprocess.run([sys.executable, "-m", "gantk", "export", "--format", "torchscript", "--checkpoint", str(ckpt),
                        "--out", str(tmp_path / name), "-q"], check=True, timeout=300)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_torchscript_keeps_the_wide_stride_1_transposed_convs(ckpt):
    """Only the seed generator's layers with one input or output channel become convs (fold.stride1_as_conv)."""
    from torch import nn

    from gantk.exporters import torchscript

    net = torchscript._prepare(Source.from_checkpoint(ckpt).generator).net
    kinds = [type(m).__name__ for m in net if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert kinds == ["Conv2d", *["ConvTranspose2d"] * 5, "Conv2d"]


# ------------------------------------------------------------------------------------------ validation


def test_torchscript_bf16_validates_beside_the_fp32_exports(ckpt, run_dir, ts_export):
    before = {p.name: p.read_bytes() for p in (run_dir / "export").glob("*")}
    r = _export(["--format", "torchscript", "--dtype", "bf16", "--checkpoint", str(ckpt), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    out = run_dir / "export" / "generator-bf16.pt"  # the fp32 files generate reads by default stay as they were
    assert report["path"] == str(out) and report["dtype"] == "bf16" and report["atol"] == TOLERANCE["bf16"]
    assert 0 < report["max_abs_diff"] <= TOLERANCE["bf16"]
    assert read_metadata(out)["dtype"] == "bf16"
    assert {p.name: p.read_bytes() for p in (run_dir / "export").glob("*") if p.name in before} == before
    assert out.stat().st_size < 0.75 * ts_export[0].stat().st_size  # bf16 weights


def _dcgan_with_batchnorm_statistics() -> Source:
    """The default architecture with non-trivial BatchNorm statistics, so that folding has something to get wrong."""
    import torch

    from gantk.models import build

    torch.manual_seed(0)
    g, _ = build("dcgan")
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.2, 0.2)
    return Source.from_generator(g.eval(), arch="dcgan")


def _fold_without_shift(monkeypatch) -> None:
    import torch

    from gantk.exporters import fold

    merge = fold._merge

    def no_shift(conv, bn):
        merged = merge(conv, bn)
        merged.bias = torch.nn.Parameter(torch.zeros_like(merged.bias), requires_grad=False)
        return merged

    monkeypatch.setattr(fold, "_merge", no_shift)


def test_torchscript_bf16_with_a_wrong_fold_fails(tmp_path, monkeypatch):
    """BatchNorm folded without its shift, on the default architecture with non-trivial statistics."""
    from gantk.errors import VerificationError

    src = _dcgan_with_batchnorm_statistics()
    right = EXPORTERS["torchscript"](src, tmp_path / "ok.pt", dtype="bf16").max_abs_diff
    assert 1e-4 < right <= TOLERANCE["bf16"]  # rounded like bf16, yet within its tolerance
    _fold_without_shift(monkeypatch)
    with pytest.raises(VerificationError, match="max abs diff"):
        EXPORTERS["torchscript"](src, tmp_path / "bad.pt", dtype="bf16")
    assert not (tmp_path / "bad.pt").exists()


@pytest.mark.parametrize("fmt, dtype", [("onnx", "fp16"), ("torchscript", "bf16")])
def test_a_wrong_rewrite_fails_a_reduced_precision_export_whatever_its_atol(tmp_path, monkeypatch, fmt, dtype):
    """Rounding must not hide a wrong rewrite: it is checked in fp32 first, at fp32's tolerance."""
    from gantk.errors import VerificationError

    src = _dcgan_with_batchnorm_statistics()
    _fold_without_shift(monkeypatch)
    with pytest.raises(VerificationError, match="its rewrite, run in fp32, does not match"):
        EXPORTERS[fmt](src, tmp_path / f"bad.{'onnx' if fmt == 'onnx' else 'pt'}", dtype=dtype, atol=10.0)
    assert not list(tmp_path.iterdir())


def test_perturbed_weight_fails_and_keeps_existing_out(ckpt, tmp_path, monkeypatch):
    """One weight of the exported graph nudged by 0.01: exit 4 with the figures, the old file untouched."""
    import onnx.numpy_helper as nh

    from gantk.exporters import onnx as onnx_exporter

    build = onnx_exporter._build

    def perturbed(*args, **kwargs):
        proto = build(*args, **kwargs)
        last = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")][-1]
        init = next(t for t in proto.graph.initializer if t.name == last.input[2])  # its bias: reaches every pixel
        w = nh.to_array(init).copy()
        w.flat[0] += 0.01
        init.CopyFrom(nh.from_array(w, init.name))
        return proto

    out = tmp_path / "g.onnx"
    assert _export(["--checkpoint", str(ckpt), "--out", str(out)]).exit_code == 0
    previous = out.read_bytes()
    monkeypatch.setattr(onnx_exporter, "_build", perturbed)
    r = _export(["--checkpoint", str(ckpt), "--out", str(out)])
    assert r.exit_code == 4, r.output
    assert "max abs diff" in r.stderr and "uint8 pixels off" in r.stderr and "left unchanged" in r.stderr
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]


def test_frozen_batch_axis_fails(ckpt, tmp_path, monkeypatch):
    """An export traced with a static batch (2) cannot run at batch 1: exit 4, nothing at --out."""
    from gantk.exporters import onnx as onnx_exporter

    monkeypatch.setattr(onnx_exporter, "_dynamic_shapes", lambda: None)
    out = tmp_path / "g.onnx"
    r = _export(["--checkpoint", str(ckpt), "--out", str(out)])
    assert r.exit_code == 4, r.output
    assert "batch size 1" in r.stderr and "nothing written" in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_batch_statistics_fail(ckpt, tmp_path, monkeypatch):
    """Training-mode BatchNorm makes image i depend on its batch: exit 4, nothing at --out."""
    import torch

    from gantk.exporters import torchscript as ts_exporter

    def batch_statistics(src, dtype="fp32"):
        g = copy.deepcopy(src.generator).train()
        with ts_exporter._quiet_jit():
            return torch.jit.script(g)

    monkeypatch.setattr(ts_exporter, "_build", batch_statistics)
    out = tmp_path / "g.pt"
    r = _export(["--format", "torchscript", "--checkpoint", str(ckpt), "--out", str(out)])
    assert r.exit_code == 4, r.output
    assert "max abs diff" in r.stderr and not out.exists()


def test_compare_reports_batch_dependence(ckpt):
    g = Source.from_checkpoint(ckpt).generator
    parity = compare(lambda z: eager(g, z) + 1e-3 * len(z) / 32, g, atol=1e-4, batch_sizes=(1, 7, 32))
    assert not parity.ok and parity.batch_consistency > 9e-4
    assert parity.per_batch[1]["max_abs_diff"] < parity.per_batch[32]["max_abs_diff"]
    nan = compare(lambda z: np.full((len(z), 1, 32, 32), np.nan, np.float32), g, atol=1e-4, batch_sizes=(1, 7))
    assert not nan.ok


def test_dcgan_exports_from_a_generator(tmp_path):
    """The strided dcgan keeps ConvTranspose (the 1x1 -> 4x4 noise projection becomes Gemm); both formats pass."""
    import onnx
    import torch

    from gantk.models import build

    torch.manual_seed(0)
    g, _ = build("dcgan")
    for m in g.modules():  # non-trivial BatchNorm statistics, so folding has something to get wrong
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    src = Source.from_generator(g, arch="dcgan")
    for fmt, name in (("onnx", "g.onnx"), ("torchscript", "g.pt")):
        report = EXPORTERS[fmt](src, tmp_path / name)
        assert report.max_abs_diff <= 1e-4, report
        assert read_metadata(tmp_path / name)["latent_shape"] == "[100, 1, 1]"
    ops = [n.op_type for n in onnx.load(str(tmp_path / "g.onnx")).graph.node]
    assert ops.count("ConvTranspose") == 3 and ops.count("Gemm") == 1 and "Conv" not in ops
    assert "BatchNormalization" not in ops and ops.index("Gemm") < ops.index("ConvTranspose")


@pytest.mark.parametrize("bn", ["grouped transposed conv", "no affine part"])
def test_batchnorm_that_cannot_fold_stays_a_layer_and_exports(tmp_path, bn):
    import torch
    from torch import nn

    from gantk.models import Generator

    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2 if bn.startswith("grouped") else 1)
    norm = nn.BatchNorm2d(6, affine=bn.startswith("grouped"))
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 2.0)
    g = Generator(nn.Sequential(nn.ConvTranspose2d(4, 4, 25), conv, norm, nn.Tanh()), (4, 6, 6))
    for fmt, name in (("onnx", "g.onnx"), ("torchscript", "g.pt")):
        assert EXPORTERS[fmt](Source.from_generator(g, arch="custom"), tmp_path / name).max_abs_diff <= 1e-4


def test_the_sha256_an_export_records_is_of_the_weights_it_exported(run_dir, tmp_path, monkeypatch):
    """Training replaces last.pt while an export reads it: the metadata names the bytes that were loaded."""
    import shutil

    import torch

    from gantk import checkpoint

    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "last.pt", last)
    loaded, newer = checkpoint.sha256(last), torch.load(last, weights_only=True)
    real, saves = torch.load, [{**newer, "step": 99}]

    def load_then_training_saves(*a, **k):
        state = real(*a, **k)
        if saves:
            checkpoint.save(saves.pop(), last)
        return state

    monkeypatch.setattr(torch, "load", load_then_training_saves)
    EXPORTERS["onnx"](last, tmp_path / "g.onnx")
    meta = read_metadata(tmp_path / "g.onnx")
    assert checkpoint.sha256(last) != loaded and meta["source_sha256"] == loaded and meta["step"] == "2"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_wrong_stride_1_conv_rewrite_fails_validation(ckpt, tmp_path, monkeypatch, fmt):
    """The seed generator's transposed convs rewritten as convs without flipping the kernel."""
    from gantk.errors import VerificationError
    from gantk.exporters import fold

    right = fold._as_conv

    def unflipped(t):
        conv = right(t)
        conv.weight.copy_(conv.weight.flip(2, 3))
        return conv

    monkeypatch.setattr(fold, "_as_conv", unflipped)
    out = tmp_path / ("g.onnx" if fmt == "onnx" else "g.pt")
    with pytest.raises(VerificationError, match="max abs diff"):
        EXPORTERS[fmt](Source.from_checkpoint(ckpt), out)
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_wrong_projection_rewrite_fails_validation(tmp_path, monkeypatch, fmt):
    """The noise projection as a matmul with its kernel flipped (as the stride-1 conv rewrite flips it)."""
    import torch

    from gantk import models
    from gantk.errors import VerificationError

    torch.manual_seed(0)
    g, _ = models.build("dcgan")
    src = Source.from_generator(g.eval(), arch="dcgan")
    right = models.Projection.of

    def flipped(t):
        p = right(t)
        cin, cout, kh, kw = t.weight.shape
        p.linear.weight.copy_(t.weight.flip(2, 3).reshape(cin, -1).t())
        return p

    monkeypatch.setattr(models.Projection, "of", staticmethod(flipped))
    out = tmp_path / ("g.onnx" if fmt == "onnx" else "g.pt")
    with pytest.raises(VerificationError, match="max abs diff"):
        EXPORTERS[fmt](src, out)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ bad input


def _bad_checkpoints(tmp_path: Path, ckpt: Path, damage) -> dict[str, Path]:
    import torch

    damaged = damage(ckpt, tmp_path / "damaged.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "config": {**state["config"], "arch": "stylegan"}}, tmp_path / "unknown_arch.pt")
    torch.save({k: v for k, v in state.items() if k != "config"}, tmp_path / "no_config.pt")
    return {"missing": tmp_path / "nope.pt", "truncated": truncated, "damaged": damaged, "foreign": foreign,
            "text": text, "unknown_arch": tmp_path / "unknown_arch.pt", "no_config": tmp_path / "no_config.pt"}


def test_bad_checkpoints_exit_2(ckpt, tmp_path, damage):
    for name, path in _bad_checkpoints(tmp_path, ckpt, damage).items():
        out = tmp_path / f"{name}.onnx"
        r = _export(["--checkpoint", str(path), "--out", str(out)])
        assert r.exit_code == 2, (name, r.output)
        assert str(path) in r.stderr and r.stderr.count("\n") == 1, (name, r.stderr)
        assert name != "damaged" or "does not match the CRC-32" in r.stderr, r.stderr
        assert name != "unknown_arch" or "architecture 'stylegan', which this gantk does not have" in r.stderr
        assert not out.exists()


def test_quiet_export_prints_nothing_and_atol_0_asks_for_bit_exact(ckpt, tmp_path):
    r = _export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "g.onnx"), "-q"])
    assert r.exit_code == 0 and r.stderr == "" and (tmp_path / "g.onnx").is_file(), r.output
    r = _export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "exact.onnx"), "--atol", "0"])
    assert r.exit_code in (0, 4) and "atol 0" in r.stderr, r.output  # a verdict, not a refusal of the option
    assert (tmp_path / "exact.onnx").exists() == (r.exit_code == 0)


@pytest.mark.parametrize("args, code, needle", [
    (["--opset", "15"], 2, "opset 15 out of range"),
    (["--opset", "27"], 2, "opset 27 out of range"),
    (["--format", "tflite"], 2, "tflite"),
    (["--format", "torchscript", "--dtype", "fp16"], 2, "fp16 is an ONNX option"),
    (["--format", "onnx", "--dtype", "bf16"], 2, "bf16 is a TorchScript option"),
    (["--format", "torchscript", "--opset", "18"], 2, "ONNX only"),
    (["--atol", "-1"], 2, "--atol must be a finite number >= 0"), (["--atol", "inf"], 2, "--atol must be a finite"),
])
def test_bad_options_exit_2(ckpt, tmp_path, args, code, needle):
    out = tmp_path / "g.onnx"
    r = _export(["--checkpoint", str(ckpt), "--out", str(out), *args])
    assert r.exit_code == code and needle in r.stderr, r.output
    assert not out.exists()


def test_out_is_a_directory_exit_2(ckpt, tmp_path):
    r = _export(["--checkpoint", str(ckpt), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "directory" in r.stderr and str(tmp_path) in r.stderr
    for folder in (f"{tmp_path / 'new'}/", f"{tmp_path / 'new'}/."):  # pathlib would drop the "/" and "/."
        r = _export(["--checkpoint", str(ckpt), "--out", folder])
        assert r.exit_code == 2 and f"{folder!r} names a folder; give a file path inside it" in r.stderr, r.output
        assert not (tmp_path / "new").exists()


def test_out_replaces_only_a_gantk_export(ckpt, tmp_path):
    """The user's file, or the checkpoint itself, at --out is refused and left as it was."""
    import shutil

    mine, own = tmp_path / "mine.onnx", tmp_path / "last.pt"
    mine.write_text("my notes")
    shutil.copy(ckpt, own)
    before = own.read_bytes()
    for out, src, fmt in ((mine, ckpt, "onnx"), (own, own, "torchscript")):
        r = _export(["--checkpoint", str(src), "--out", str(out), "--format", fmt])
        assert r.exit_code == 2 and "not a gantk export" in r.stderr and r.stderr.count("\n") == 1, r.output
    cut = tmp_path / "cut.onnx"  # an export cut short: named, with why, and left for the user to move
    assert _export(["--checkpoint", str(ckpt), "--out", str(cut)]).exit_code == 0
    cut.write_bytes(cut.read_bytes()[:3000])
    r = _export(["--checkpoint", str(ckpt), "--out", str(cut)])
    assert r.exit_code == 2 and "exists and is not a gantk export (not a gantk checkpoint, ONNX or TorchScript " \
        "file" in r.stderr and "move it away" in r.stderr and len(cut.read_bytes()) == 3000, r.output
    r = _export(["--checkpoint", str(own), "--out", str(own)])  # an ONNX export under a .pt name
    assert r.exit_code == 2 and ".pt names a TorchScript file; this export is ONNX" in r.stderr, r.output
    assert mine.read_text() == "my notes" and own.read_bytes() == before
    out = tmp_path / "g.onnx"
    for _ in range(2):  # an export is replaced by the next one
        assert _export(["--checkpoint", str(ckpt), "--out", str(out)]).exit_code == 0


def test_a_file_in_the_out_path_is_exit_2_and_a_failed_export_leaves_no_folder(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    r = _export(["--checkpoint", str(ckpt), "--out", str(blocker / "sub" / "g.onnx")])
    assert r.exit_code == 2 and f"{blocker} is a file, not a folder" in r.stderr, r.output
    r = _export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "new" / "sub" / "g.onnx"), "--atol", "1e-12"])
    assert r.exit_code == 4 and not (tmp_path / "new").exists(), r.output


def test_a_library_error_raised_while_stopping_is_the_stop(ckpt, tmp_path, monkeypatch):
    """torch.onnx.export, hit by SIGTERM while it imports torch._dynamo, fails with an error of its own."""
    from gantk.errors import GantkError, Terminated
    from gantk.exporters import onnx as onnx_exporter

    def stopped(*args, **kwargs):
        try:
            raise Terminated
        except KeyboardInterrupt:
            raise AttributeError("partially initialized module 'torch._dynamo'")  # noqa: B904

    def build(*args, **kwargs):
        try:
            stopped()
        except AttributeError as e:
            raise GantkError(f"torch.onnx.export failed ({e})") from None

    monkeypatch.setattr(onnx_exporter, "_build", build)
    r = _export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "g.onnx")])
    assert r.exit_code == 143 and r.stderr.strip() == "gantk: interrupted", r.output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_export_leaves_no_temp_file(ckpt, tmp_path, default_signals, signum):
    out = tmp_path / "made" / "g.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "gantk", "export", "--checkpoint", str(ckpt), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(".g.onnx.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the export ended before the signal could land"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum and err.strip().endswith("gantk: interrupted"), err
    assert not (tmp_path / "made").exists()  # its temp file and the folder it made are gone


def test_an_export_removes_the_temp_files_killed_exports_left(ckpt, tmp_path):
    """A SIGKILL leaves a temp file beside --out; the next export of it removes those an hour old."""
    out = tmp_path / "g.onnx"
    old, recent, other = (tmp_path / ".g.onnx.k1ll3d.tmp", tmp_path / ".g.onnx.runn1n.tmp",
                          tmp_path / ".h.onnx.k1ll3d.tmp")
    for p in (old, recent, other):
        p.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200,) * 2)
    os.utime(other, (time.time() - 7200,) * 2)
    assert _export(["--checkpoint", str(ckpt), "--out", str(out), "-q"]).exit_code == 0
    assert not old.exists() and recent.exists() and other.exists()  # another export's may still be running


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_folder_exit_1(ckpt, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    r = _export(["--checkpoint", str(ckpt), "--out", str(folder / "g.onnx")])
    assert r.exit_code == 1 and "not writable" in r.stderr and str(folder) in r.stderr


def test_no_runs_exit_2(tmp_path):
    r = _export(["--runs-dir", str(tmp_path)])
    assert r.exit_code == 2 and "gantk train" in r.stderr


# ------------------------------------------------------------------------------------------ info


def test_info_checkpoint(ckpt):
    r = CliRunner().invoke(cli, ["info", str(ckpt), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kind"] == "checkpoint" and d["step"] == 2 and d["images_seen"] == 64
    assert d["generator_parameters"] == 276541  # the seed generator's weights and biases, not BN statistics
    assert d["best_fid"] is None and "Infinity" not in r.stdout  # strict JSON: no FID yet is null, not Infinity
    assert d["config"]["arch"] == "seed" and len(d["sha256"]) == 64 and d["size_bytes"] == ckpt.stat().st_size
    assert d["inputs"] == [{"name": "z", "shape": ["N", 1, 6, 6], "dtype": "float32"}]


def test_info_onnx_human_and_json(onnx_export):
    path = onnx_export[0]
    d = json.loads(CliRunner().invoke(cli, ["info", str(path), "--json"]).stdout)
    assert d["kind"] == "onnx" and d["opset"] == 20 and d["metadata"]["latent_shape"] == [1, 6, 6]
    assert d["outputs"][0]["name"] == "image" and d["outputs"][0]["shape"][1:] == [1, 32, 32]
    r = CliRunner().invoke(cli, ["info", str(path)])
    assert r.exit_code == 0 and "kind: onnx" in r.stderr and "gantk-generator" in r.stderr


def test_info_and_read_metadata_reject_non_gantk_files(ckpt, tmp_path, damage):
    import onnx
    from onnx import helper

    from gantk.errors import CheckpointError

    plain = tmp_path / "plain.onnx"
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                  [helper.make_tensor_value_info("y", 1, [1])])), str(plain))
    bad = {**_bad_checkpoints(tmp_path, ckpt, damage), "plain_onnx": plain}
    for name, path in bad.items():
        r = CliRunner().invoke(cli, ["info", str(path)])
        assert r.exit_code == 2 and str(path) in r.stderr and r.stderr.count("\n") == 1, (name, r.output)
    for path in (plain, bad["text"], ckpt):
        with pytest.raises(CheckpointError):
            read_metadata(path)


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_cuda_checkpoint_exports_and_runs_on_cuda(tmp_path):
    """A checkpoint trained on CUDA exports in both formats; the ONNX file also matches on the CUDA provider."""
    import onnxruntime as ort
    import torch

    from gantk.config import TrainConfig
    from gantk.train import train

    cfg = TrainConfig(data="synthetic", data_count=64, arch="dcgan", epochs=1, max_steps=2, device="cuda")
    ckpt = Path(train(cfg, runs_dir=tmp_path / "runs")["run_dir"]) / "checkpoints" / "last.pt"
    for fmt in EXPORTERS:
        report = EXPORTERS[fmt](ckpt, tmp_path / f"g.{fmt}")
        assert report.max_abs_diff <= 1e-4, report
    z = fixed_noise((100, 1, 1), count=64)
    m = torch.jit.load(str(tmp_path / "g.torchscript"), map_location="cuda")
    with torch.inference_mode():
        got = m(torch.from_numpy(z).cuda()).cpu().numpy()
    np.testing.assert_allclose(got, _eager(ckpt, z), atol=5e-3)  # TF32/cuDNN rounding
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider; TorchScript on CUDA passed")
    s = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CUDAExecutionProvider"])
    assert s.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(s.run(None, {"z": z})[0], _eager(ckpt, z), atol=5e-3)

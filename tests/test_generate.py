"""gantk generate: determinism across batch sizes, splits and shards; resume after a kill; idempotence;
damaged files; parity failure; bad input. One tiny seed run, exported once, for the whole module."""
from __future__ import annotations

import errno
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from gantk.cli import cli
from gantk.errors import GantkError, UsageError
from gantk.generate import Request, noise, parity_indices, to_pixels


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A 2-step seed run on synthetic digits, exported to ONNX and TorchScript by gantk's exporters."""
    from gantk.config import TrainConfig
    from gantk.exporters import EXPORTERS
    from gantk.train import train

    runs = tmp_path_factory.mktemp("genruns")
    run = Path(train(TrainConfig(data="synthetic", data_count=64, max_steps=2, epochs=1), runs_dir=runs)["run_dir"])
    ckpt = run / "checkpoints" / "last.pt"
    EXPORTERS["onnx"](ckpt, run / "export" / "generator.onnx")
    EXPORTERS["torchscript"](ckpt, run / "export" / "generator.pt")
    return {"runs": runs, "run": run, "ckpt": ckpt, "onnx": run / "export" / "generator.onnx",
            "pt": run / "export" / "generator.pt"}


def gen(model: Path, out: Path, *args: str, code: int = 0):
    r = CliRunner().invoke(cli, ["generate", "--model", str(model), "--out", str(out), "-q", *args])
    assert r.exit_code == code, (r.exit_code, r.output, r.stderr if hasattr(r, "stderr") else "")
    return r


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png")) if p.name != "grid.png"}


def _levels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def mtimes(folder: Path) -> dict[str, int]:
    return {".": folder.stat().st_mtime_ns, **{p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}}


# ------------------------------------------------------------------------------------------ determinism


def test_noise_depends_only_on_seed_and_index():
    a = noise(3, range(10), (1, 6, 6))
    assert np.array_equal(noise(3, [7], (1, 6, 6))[0], a[7])
    assert not np.array_equal(noise(4, [7], (1, 6, 6))[0], a[7])
    assert a.dtype == np.float32 and abs(float(a.std()) - 1) < 0.3


def test_pixels_round_half_range():
    x = np.array([-1.0, 1.0, 0.0, -2.0], np.float32).reshape(1, 1, 1, 4)
    assert to_pixels(x).tolist() == [[[0, 255, 128, 0]]]


def test_batch_size_independence(exported, tmp_path):
    gen(exported["onnx"], tmp_path / "b1", "--count", "40", "--batch-size", "1")
    gen(exported["onnx"], tmp_path / "b256", "--count", "40", "--batch-size", "256")
    gen(exported["onnx"], tmp_path / "b7", "--count", "40", "--batch-size", "7")
    a = pngs(tmp_path / "b1")
    assert len(a) == 40 and a == pngs(tmp_path / "b256") == pngs(tmp_path / "b7")
    assert len(set(a.values())) > 1  # not one image repeated: the test could fail
    assert (tmp_path / "b1" / "manifest.json").read_bytes() == (tmp_path / "b256" / "manifest.json").read_bytes()


def test_streams_write_the_bytes_of_one_run(exported, tmp_path):
    """Concurrent 1-thread runs on slices of each batch (the npy default) change no byte."""
    gen(exported["onnx"], tmp_path / "s1", "--count", "40", "--streams", "1")
    gen(exported["onnx"], tmp_path / "s3", "--count", "40", "--streams", "3", "--batch-size", "16")
    assert pngs(tmp_path / "s1") == pngs(tmp_path / "s3")
    settings = json.loads((tmp_path / "s3" / "summary.json").read_text())["settings"]
    assert (settings["streams"], settings["intra_op_num_threads"]) == (3, 1)
    r = gen(exported["onnx"], tmp_path / "npy", "--count", "40", "--format", "npy", "--json")

    from gantk.backends import MAX_STREAMS, cores

    assert np.array_equal(np.load(next((tmp_path / "npy").glob("*.npy"))),
                          np.stack([np.asarray(Image.open(tmp_path / "s1" / f"{i:06d}.png")) for i in range(40)]))

    assert json.loads(r.stdout)["settings"]["streams"] == min(cores(), MAX_STREAMS)


def test_bf16_torchscript_generates_batch_invariant_with_its_tolerance(exported, tmp_path, monkeypatch):
    from gantk import backends
    from gantk.exporters import EXPORTERS
    from gantk.exporters.validate import TOLERANCE

    model = tmp_path / "g-bf16.pt"
    EXPORTERS["torchscript"](exported["ckpt"], model, dtype="bf16")
    monkeypatch.setattr(backends, "native_bf16", lambda: True)
    a = json.loads(gen(model, tmp_path / "a", "--backend", "torchscript", "--count", "70", "--json").stdout)
    gen(model, tmp_path / "b", "--backend", "torchscript", "--count", "70", "--batch-size", "9")
    assert pngs(tmp_path / "a") == pngs(tmp_path / "b") and a["parity"]["atol"] == TOLERANCE["bf16"]
    assert a["warnings"] == [] and a["parity"]["max_abs_diff"] > 1e-4  # it did run in bf16
    monkeypatch.setattr(backends, "native_bf16", lambda: False)  # a CPU without AVX512-BF16/AMX: said
    r = gen(model, tmp_path / "c", "--backend", "torchscript", "--count", "5", "--json")
    assert "emulated" in r.stderr and json.loads(r.stdout)["warnings"]


def test_cpu_plan_defaults(monkeypatch):
    from gantk import backends

    monkeypatch.setattr(backends, "cores", lambda: 2)
    assert backends.cpu_plan("onnxruntime", None, None, fmt="png") == (1, 2)  # the writers share the cores
    assert backends.cpu_plan("onnxruntime", None, None, fmt="npy") == (1, 2)
    assert backends.cpu_plan("onnxruntime", 2, None) == (2, 1)
    assert backends.cpu_plan("torch", None, None, fmt="png") == backends.cpu_plan("torch", None, None, fmt="npy") \
        == (1, 1)  # torch's bf16 sums depend on the thread count: the same threads for both formats
    monkeypatch.setattr(backends, "cores", lambda: 1)
    assert backends.cpu_plan("onnxruntime", None, None, fmt="png") == (1, 1)
    monkeypatch.setattr(backends, "cores", lambda: 3)  # above 2 cores the writers keep a core of their own
    assert backends.cpu_plan("onnxruntime", None, None, fmt="png") == (1, 2)
    monkeypatch.setattr(backends, "cores", lambda: 16)
    assert backends.cpu_plan("onnxruntime", None, None, fmt="png") == (1, 4)
    assert backends.cpu_plan("onnxruntime", None, None, fmt="npy") == (1, backends.MAX_STREAMS)
    assert backends.cpu_plan("torchscript", None, None) == (4, 1)
    assert backends.cpu_plan("torchscript", None, None, fmt="npy") == (4, 1)


def test_the_summary_line_says_what_the_defaults_picked(exported, tmp_path, monkeypatch):
    from gantk import backends

    monkeypatch.setattr(backends, "cores", lambda: 2)
    r = CliRunner().invoke(cli, ["generate", "--model", str(exported["onnx"]), "--out", str(tmp_path / "a"),
                                 "--count", "20"])
    assert "(onnxruntime on cpu, 2 streams of 1 thread, 2 writers)" in r.stderr, r.stderr
    r = CliRunner().invoke(cli, ["generate", "--model", str(exported["onnx"]), "--out", str(tmp_path / "b"),
                                 "--count", "20", "--format", "npy", "--threads", "2"])
    assert "(onnxruntime on cpu, 2 threads)" in r.stderr, r.stderr


def test_npy_keeps_the_workers_png_would_have(exported, tmp_path, monkeypatch):
    """Its extra streams are the CPU's; on a GPU host they idle, and noise needs the workers there."""
    from gantk import backends

    monkeypatch.setattr(backends, "cores", lambda: 16)
    doc = json.loads(gen(exported["onnx"], tmp_path / "npy", "--count", "40", "--format", "npy", "--json").stdout)
    assert (doc["writers"], doc["settings"]["streams"]) == (12, backends.MAX_STREAMS)


def test_split_range_and_shards_equal_one_run(exported, tmp_path):
    gen(exported["onnx"], tmp_path / "one", "--count", "30", "--start", "5")
    gen(exported["onnx"], tmp_path / "split", "--count", "12", "--start", "5")
    gen(exported["onnx"], tmp_path / "split", "--count", "18", "--start", "17")
    for k in range(3):
        gen(exported["onnx"], tmp_path / "shards", "--count", "30", "--start", "5", "--shard", f"{k}/3")
    gen(exported["onnx"], tmp_path / "shard1", "--count", "30", "--start", "5", "--shard", "1/3")
    one = pngs(tmp_path / "one")
    assert sorted(one) == [f"{i:06d}.png" for i in range(5, 35)]
    assert pngs(tmp_path / "split") == one == pngs(tmp_path / "shards")
    assert pngs(tmp_path / "shard1") == {n: b for n, b in one.items() if int(n[:6]) % 3 == 1}
    manifest = (tmp_path / "one" / "manifest.json").read_bytes()
    assert (tmp_path / "split" / "manifest.json").read_bytes() == manifest
    assert (tmp_path / "shards" / "manifest.json").read_bytes() == manifest


def test_shards_running_at_once_into_one_folder_equal_one_run(exported, tmp_path):
    """As on several machines over a shared filesystem: no manifest entry and no in-flight file is lost."""
    cmd = [sys.executable, "-m", "gantk", "generate", "--model", str(exported["onnx"]), "--out",
           str(tmp_path / "shards"), "-q", "--count", "3000"]
    procs = [subprocess.Popen([*cmd, "--shard", f"{k}/3"], stderr=subprocess.PIPE) for k in range(3)]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    gen(exported["onnx"], tmp_path / "one", "--count", "3000")
    assert (tmp_path / "shards" / "manifest.json").read_bytes() == (tmp_path / "one" / "manifest.json").read_bytes()
    assert pngs(tmp_path / "shards") == pngs(tmp_path / "one")


def test_manifest_flush_takes_in_what_another_run_recorded(tmp_path):
    from gantk.generate import Folder, read_manifest

    ident = {"model_sha256": "a", "seed": 0, "format": "png", "latent_shape": [1]}
    a, b = Folder(tmp_path, ident), Folder(tmp_path, ident)  # both opened before either wrote
    a.files[0] = {"file": "000000.png", "sha256": "x0"}
    a.flush()
    b.files[1] = {"file": "000001.png", "sha256": "x1"}
    b.arrays["images-000000-000040-shard1of2.npy"] = {"file": "images-000000-000040-shard1of2.npy", "sha256": "n"}
    b.flush()
    a.files[2] = {"file": "000002.png", "sha256": "x2"}
    a.arrays["images-000000-000040-shard0of2.npy"] = {"file": "images-000000-000040-shard0of2.npy", "sha256": "m"}
    a.flush()
    doc = read_manifest(tmp_path)
    assert [r["index"] for r in doc["files"]] == [0, 1, 2] and len(doc["arrays"]) == 2
    other = Folder(tmp_path, {**ident, "seed": 1})
    other.files[5] = {"file": "000005.png", "sha256": "y"}
    with pytest.raises(GantkError, match="different model/seed/format"):
        other.flush()
    assert [r["index"] for r in read_manifest(tmp_path)["files"]] == [0, 1, 2]
    # --overwrite runs X -> Y and Y -> X at once: each may replace the other's manifest once, not again
    x, y = Folder(tmp_path, ident), Folder(tmp_path, {**ident, "seed": 1}, replaces=ident)
    y.files[5] = {"file": "000005.png", "sha256": "y"}
    y.flush()
    x = Folder(tmp_path, ident, replaces={**ident, "seed": 1})
    x.flush()
    y.files[6] = {"file": "000006.png", "sha256": "y"}
    with pytest.raises(GantkError, match="different model/seed/format"):
        y.flush()


def test_a_folder_that_cannot_be_locked_warns_once_and_still_gets_its_manifest(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from gantk.generate import Folder, read_manifest

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    f = Folder(tmp_path, {"model_sha256": "a", "seed": 0, "format": "png", "latent_shape": [1]})
    for i in range(2):
        f.files[i] = {"file": f"{i:06d}.png", "sha256": "x"}
        f.flush()
    assert [r["index"] for r in read_manifest(tmp_path)["files"]] == [0, 1]
    assert sum("cannot lock" in r.message for r in caplog.records) == 1


def test_temp_files_of_live_runs_survive_the_cleanup(tmp_path):
    from gantk.generate import HOST, TMP_PREFIX, _clean_temps

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exited, not yet reaped (a killed run's worker)
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)
    try:
        keep = [f"{TMP_PREFIX}000001.png-{HOST}-{live.pid}-7",
                f"{TMP_PREFIX}000006.png-otherhost-{dead.pid}-7",  # another machine's: its pids are not ours
                f"{TMP_PREFIX}probe-x1y2"]
        drop = [f"{TMP_PREFIX}000002.png-{HOST}-{dead.pid}-7", f"{TMP_PREFIX}000003.png-{HOST}-{os.getpid()}-7",
                f"{TMP_PREFIX}000005.png-{HOST}-{zombie.pid}-7", f"{TMP_PREFIX}000004.png-{HOST}-{live.pid}-8",
                f"{TMP_PREFIX}000007.png-otherhost-{live.pid}-7", f"{TMP_PREFIX}images-0-40.npy-{HOST}-{dead.pid}-7"]
        for n in keep + drop:
            (tmp_path / n).write_bytes(b"")
        for n in drop[3:5]:  # old enough to belong to no write in flight
            os.utime(tmp_path / n, (time.time() - 7200, time.time() - 7200))
        _clean_temps(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    finally:
        live.kill()
        live.wait()
        zombie.wait()



@pytest.mark.parametrize("fs", ["this one", "without O_TMPFILE"])
@pytest.mark.parametrize("by", ["path", "folder descriptor"])
def test_atomic_write_creates_replaces_and_leaves_no_partial_file(tmp_path, monkeypatch, fs, by):
    from gantk import generate as g

    monkeypatch.setattr(g, "_NO_TMPFILE", set())
    dir_fd = g._open_dir(tmp_path) if by == "folder descriptor" else None
    assert (dir_fd is None) == (by == "path")
    real_open, replaced = os.open, []
    if fs == "without O_TMPFILE":
        def no_tmpfile(path, flags, *args, **kwargs):
            if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
            return real_open(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", no_tmpfile)
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b, **kw: (replaced.append(b), real_replace(a, b, **kw)))

    write = lambda path, data: g._write_atomic(path, data, dir_fd)  # noqa: E731
    path = tmp_path / "000001.png"
    write(path, b"first")
    unnamed = str(tmp_path) not in g._NO_TMPFILE
    assert path.read_bytes() == b"first" and (path.stat().st_mode & 0o777) == 0o644 & ~_umask()
    assert unnamed == (not replaced)  # an unnamed file linked in, or the temp file + rename fallback
    if fs == "without O_TMPFILE":
        assert not unnamed
    write(path, b"second")  # an existing name: replaced whole
    assert path.read_bytes() == b"second" and sorted(os.listdir(tmp_path)) == ["000001.png"]

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", disk_full)
    for name in ("000001.png", "000002.png"):
        with pytest.raises(OSError, match="No space"):
            write(tmp_path / name, b"third")
    assert path.read_bytes() == b"second" and not (tmp_path / "000002.png").exists()
    if unnamed:  # a failed unnamed file vanishes with its descriptor (temp files wait for _clean_temps)
        assert sorted(os.listdir(tmp_path)) == ["000001.png"]
    if dir_fd is not None:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

def test_torch_backends_batch_independent_and_close_to_onnx(exported, tmp_path):
    gen(exported["ckpt"], tmp_path / "t1", "--backend", "torch", "--count", "20", "--batch-size", "1")
    gen(exported["ckpt"], tmp_path / "t9", "--backend", "torch", "--count", "20", "--batch-size", "9")
    gen(exported["pt"], tmp_path / "ts", "--backend", "torchscript", "--count", "20")
    gen(exported["onnx"], tmp_path / "ox", "--count", "20")
    assert pngs(tmp_path / "t1") == pngs(tmp_path / "t9")
    read = lambda d: np.load(_npy(exported, d, tmp_path))  # noqa: E731
    eager, onnx = read("torch"), read("onnxruntime")
    assert (eager != onnx).mean() < 1e-3
    summary = json.loads((tmp_path / "t1" / "summary.json").read_text())
    assert summary["parity"]["status"] == "not-applicable"
    assert json.loads((tmp_path / "ts" / "summary.json").read_text())["parity"]["status"] == "passed"


@pytest.mark.parametrize("backend, model", [("torch", "ckpt"), ("torchscript", "pt")])
def test_a_torch_backend_leaves_the_process_thread_count_as_it_was(exported, backend, model):
    import torch

    from gantk.backends import open_backend

    before = torch.get_num_threads()
    be = open_backend(backend, exported[model], provider="cpu", batch_size=8, threads=before + 1)
    be(noise(0, range(3), be.latent_shape))
    assert torch.get_num_threads() == before  # eval embeds with torch after sampling through it


def test_a_gpu_would_compute_on_one_shape_whatever_the_batch_size(exported, tmp_path, monkeypatch):
    """The CPU half of the GPU tests below: generate asks every backend for GPU_BATCH, not --batch-size."""
    from gantk import backends

    asked, original = [], backends.open_backend
    monkeypatch.setattr(backends, "open_backend", lambda *a, **k: asked.append(k["batch_size"]) or original(*a, **k))
    for bs in ("7", "300"):
        gen(exported["onnx"], tmp_path / bs, "--count", "10", "--batch-size", bs)
    assert asked == [backends.GPU_BATCH] * 2


def _npy(exported, backend: str, tmp_path: Path) -> Path:
    model = exported["ckpt"] if backend == "torch" else exported["onnx"]
    out = tmp_path / f"npy-{backend}"
    gen(model, out, "--backend", backend, "--count", "20", "--format", "npy")
    return next(out.glob("images-*.npy"))


def test_npy_matches_pngs_and_grid(exported, tmp_path):
    gen(exported["onnx"], tmp_path / "p", "--count", "12", "--grid")
    gen(exported["onnx"], tmp_path / "n", "--count", "12", "--format", "npy", "--grid")
    arr = np.load(tmp_path / "n" / "images-000000-000012.npy")
    assert arr.shape == (12, 32, 32) and arr.dtype == np.uint8
    for i in range(12):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "p" / f"{i:06d}.png")), arr[i])
    assert (tmp_path / "p" / "grid.png").read_bytes() == (tmp_path / "n" / "grid.png").read_bytes()
    with Image.open(tmp_path / "p" / "000003.png") as im:
        assert im.mode == "L" and im.size == (32, 32)


def test_summary_says_where_the_time_went(exported, tmp_path):
    png = json.loads(gen(exported["onnx"], tmp_path / "p", "--count", "70", "--batch-size", "32", "--json").stdout)
    t = png["timing"]
    assert {"noise", "noise_wait", "inference", "png_writers", "png_wait", "manifest"} <= set(t)
    assert t["inference"] > 0 and t["png_writers"] > 0 and t["noise"] > 0
    assert t["inference"] + t["noise_wait"] + t["png_wait"] <= png["seconds"] + 2e-3  # the timed thread's stages
    assert 0 < t["workers_cpu"] <= t["cpu"]  # worker threads here: their CPU is this process's
    npy = json.loads(gen(exported["onnx"], tmp_path / "n", "--count", "70", "--format", "npy", "--json").stdout)
    assert {"npy_write", "pixels", "inference"} <= set(npy["timing"]) and "png_writers" not in npy["timing"]
    assert npy["timing"]["cpu"] > 0


def test_cpu_time_counts_the_worker_processes(exported, tmp_path, monkeypatch):
    """`timing.cpu` is this process's CPU plus its worker processes': PNG work made heavy shows in it."""
    from gantk import generate as generate_mod

    encode = generate_mod.encode_png

    def heavy(px):
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.004:
            pass
        return encode(px)

    monkeypatch.setattr(generate_mod, "PROCESS_MIN_IMAGES", 1)
    monkeypatch.setattr(generate_mod, "encode_png", heavy)  # the workers are forked after this
    t = json.loads(gen(exported["onnx"], tmp_path / "p", "--count", "100", "--writers", "2", "--json").stdout)["timing"]
    assert t["workers_cpu"] >= 100 * 0.004
    assert t["cpu"] > t["workers_cpu"]  # this process's own CPU (inference) on top


def test_process_workers_write_the_same_bytes_as_threads(exported, tmp_path, monkeypatch):
    from gantk import generate as generate_mod

    gen(exported["onnx"], tmp_path / "threads", "--count", "150", "--batch-size", "64", "--writers", "2")
    monkeypatch.setattr(generate_mod, "PROCESS_MIN_IMAGES", 1)
    monkeypatch.setattr(generate_mod, "NOISE_CHUNK", 20)  # several noise tasks per batch
    gen(exported["onnx"], tmp_path / "procs", "--count", "150", "--batch-size", "64", "--writers", "3")
    a = pngs(tmp_path / "threads")
    assert len(a) == 150 and a == pngs(tmp_path / "procs")
    assert (tmp_path / "threads" / "manifest.json").read_bytes() == (tmp_path / "procs" / "manifest.json").read_bytes()
    gen(exported["onnx"], tmp_path / "npy", "--count", "150", "--format", "npy")
    arr = np.load(tmp_path / "npy" / "images-000000-000150.npy")
    assert all(np.array_equal(np.asarray(__import__("PIL.Image").Image.open(tmp_path / "threads" / f"{i:06d}.png")), arr[i])
               for i in (0, 77, 149))


def test_iobinding_runner_matches_a_plain_run(exported):
    """The device-resident runner of the CUDA/TensorRT providers, exercised here on CPU OrtValues."""
    import onnxruntime as ort

    from gantk.backends import IOBound, fixed_batch

    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    latent = tuple(session.get_inputs()[0].shape[1:])
    z = noise(0, range(21), latent)
    bound = IOBound(ort, session, latent, 8, device="cpu")
    got = fixed_batch(bound, 8, latent)(z)  # 8 + 8 + 5 padded
    want = session.run(["image"], {"z": z})[0]
    assert got.shape == (21, 1, 32, 32) and np.abs(got - want).max() < 1e-5
    bound.run()  # device-resident: the output stays bound and is the last batch's
    assert np.abs(bound.out.numpy()[:5] - want[16:]).max() < 1e-5


# ------------------------------------------------------------------------------------------ re-runs


def test_rerun_is_a_noop(exported, tmp_path):
    out = tmp_path / "d"
    gen(exported["onnx"], out, "--count", "25", "--grid")
    before = mtimes(out)
    time.sleep(0.01)
    r = gen(exported["onnx"], out, "--count", "25", "--grid", "--json")
    doc = json.loads(r.stdout)
    assert doc["written"] == 0 and doc["unchanged"] == 25 and doc["summary_written"] is False
    assert mtimes(out) == before


def test_damaged_and_missing_files_are_rewritten(exported, tmp_path):
    out = tmp_path / "d"
    gen(exported["onnx"], out, "--count", "20")
    good = pngs(out)
    (out / "000004.png").write_bytes(b"garbage")
    (out / "000011.png").unlink()
    untouched = (out / "000012.png").stat().st_mtime_ns
    doc = json.loads(gen(exported["onnx"], out, "--count", "20", "--json").stdout)
    assert doc["written"] == 2 and pngs(out) == good
    assert (out / "000012.png").stat().st_mtime_ns == untouched


def _children(pid: int) -> list[int]:
    return [int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_killed_run_resumes_byte_identical(exported, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    args = ["--count", "6000", "--batch-size", "16", "--writers", "1"]  # time to land mid-run on a busy CI
    gen(exported["onnx"], ref, *args)
    cmd = [sys.executable, "-m", "gantk", "generate", "--model", str(exported["onnx"]), "--out", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.png"))) < 300 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the kill could land mid-run"
    workers = _children(proc.pid)  # 6000 images: a process pool
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers and not any(map(_alive, workers)), "workers outlived the killed run"
    written = len(list(out.glob("*.png")))
    assert 0 < written < 6000, "the kill has to land mid-run"
    doc = json.loads(gen(exported["onnx"], out, *args, "--json").stdout)
    assert (doc["unchanged"], doc["written"]) == (written, 6000 - written)  # every file on disk was whole
    assert pngs(out) == pngs(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no temp files left


def _signal_mask(pid: int, field: str) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split(f"{field}:")[1].split()[0], 16)


@pytest.mark.parametrize("signum, group, twice", [(signal.SIGINT, False, False), (signal.SIGTERM, True, False),
                                                  (signal.SIGINT, False, True)])
def test_ctrl_c_or_sigterm_says_how_many_images_are_kept_and_the_same_command_continues(
        exported, tmp_path, default_signals, signum, group, twice):
    out = tmp_path / "cut"
    args = ["--count", "6000", "--batch-size", "16", "--writers", "1"]  # 6000: time to land mid-run on a busy CI
    cmd = [sys.executable, "-m", "gantk", "generate", "--model", str(exported["onnx"]), "--out", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=group,
                            preexec_fn=default_signals)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.png"))) < 300 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal could land mid-run"
    assert not _signal_mask(proc.pid, "SigIgn") & (1 << (signum - 1)), "the run ignores the signal"
    for worker in _children(proc.pid):  # the pool's own SIGTERM must end a worker (it hung the run's exit)
        assert not _signal_mask(worker, "SigCgt") & (1 << (signal.SIGTERM - 1)), "a worker catches SIGTERM"
    for _ in range(2 if twice else 1):
        if group:  # as a scheduler stops a job: the workers get it too
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        time.sleep(0.03)
    _, err = proc.communicate(timeout=60)
    # twice: the second lands while the first's clean-up records the finished images, or, rarely, after
    # gantk has said so and its handler is gone (the process then dies of it: the same 130 in a shell)
    assert proc.returncode == 128 + signum or (twice and proc.returncode == -signum), err
    kept = int(re.search(r"interrupted: (\d+) of 6000 images are in", err).group(1))
    lines = [x for x in err.strip().splitlines() if "already stopping, recording what was written" not in x]
    assert 0 < kept < 6000 and len(lines) == 1, err
    assert len(json.loads((out / "manifest.json").read_text())["files"]) == kept == len(pngs(out))  # all recorded
    doc = json.loads(gen(exported["onnx"], out, *args, "--json").stdout)
    assert (doc["unchanged"], doc["written"]) == (kept, 6000 - kept)


def test_a_second_signal_waits_for_the_clean_up_that_records_the_images(caplog):
    from gantk.errors import signals_wait

    before = signal.getsignal(signal.SIGINT)
    with caplog.at_level(logging.WARNING, logger="gantk"), signals_wait():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here, and raises nothing
    assert "signal 2: already stopping, recording what was written first (again to stop at once)" in caplog.text
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt), signals_wait():  # one more: a clean-up that hangs can be stopped
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_chunk_submitted_as_the_signal_lands_is_recorded(exported, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    import gantk.generate as G
    from gantk.backends import open_backend

    class Cut(ThreadPoolExecutor):
        chunks = 0

        def submit(self, fn, *a, **k):
            fut = super().submit(fn, *a, **k)
            if fn is G._write_chunk:
                Cut.chunks += 1
                if Cut.chunks == 3:
                    fut.result()  # written
                    raise KeyboardInterrupt  # after the submit, before write_pngs holds its future
            return fut

    out = tmp_path / "d"
    out.mkdir()
    be = open_backend("onnxruntime", exported["onnx"], provider="cpu")
    req = Request(out=out, count=200, batch_size=16, writers=2)
    folder = G.Folder(out, {"model_sha256": "x"})
    with Cut(2) as pool, pytest.raises(KeyboardInterrupt):
        G.write_pngs(be, req, folder, list(req.indices()), pool, lambda ev: None, G.Timing())
    assert len(folder.files) >= 48 and sorted(folder.files) == sorted(int(p.stem) for p in out.glob("*.png"))


def test_a_signal_while_the_report_is_on_its_way_keeps_the_report(exported, tmp_path, monkeypatch):
    """A stop's report, hit by a further signal on its way out, is still the report (not 'before any image')."""
    import gantk.generate as G
    from gantk.errors import Interrupted

    def stopped(*a, **k):
        try:
            raise Interrupted("interrupted: 5 of 20 images are in d; the same command writes the rest")
        except Interrupted:
            raise KeyboardInterrupt  # the further signal

    monkeypatch.setattr(G, "_generate", stopped)
    with pytest.raises(Interrupted, match="interrupted: 5 of 20 images are in d"):
        G.generate(Request(out=tmp_path / "d", count=20), model=exported["onnx"])


@pytest.mark.parametrize("where", ["parity_check", "write_grid"])
def test_sigterm_before_or_after_the_images_is_exit_143_and_one_line(exported, tmp_path, monkeypatch, where):
    import gantk.generate as G

    def stopped(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    def unhandled(signum, frame):
        raise RuntimeError("gantk left SIGTERM to the default handler here")

    monkeypatch.setattr(G, where, stopped)
    out, previous = tmp_path / "d", signal.signal(signal.SIGTERM, unhandled)  # would kill pytest otherwise
    try:
        r = gen(exported["onnx"], out, "--count", "20", "--grid", code=143)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if where == "parity_check":
        assert r.stderr.strip() == "gantk: interrupted before any image was written" and not out.exists()
    else:
        assert "interrupted: 20 of 20 images are in" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert len(json.loads((out / "manifest.json").read_text())["files"]) == 20
        assert not (out / "summary.json").exists()
    monkeypatch.undo()
    doc = json.loads(gen(exported["onnx"], out, "--count", "20", "--grid", "--json").stdout)
    assert doc["written"] + doc["unchanged"] == 20 and (out / "summary.json").exists()


def test_an_npy_folder_of_several_runs_loads_one_image_per_index(exported, tmp_path):
    from gantk import data

    out = tmp_path / "n"
    for args in (["--count", "30"], ["--count", "40"], ["--start", "40", "--count", "10", "--shard", "1/2"]):
        gen(exported["onnx"], out, "--format", "npy", *args)
    whole = np.load(out / "images-000000-000040.npy")
    d = data.load(str(out))
    assert len(d) == 45 and np.array_equal(d.images[:40], whole)
    assert np.array_equal(d.images[40:], np.load(out / "images-000041-000050-shard1of2.npy"))


def test_a_damaged_manifest_is_named_as_such(exported, tmp_path):
    out = tmp_path / "d"
    gen(exported["onnx"], out, "--count", "3")
    manifest = out / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:-20])
    r = gen(exported["onnx"], out, "--count", "3", code=2)
    assert "is a damaged gantk manifest" in r.stderr
    manifest.write_text('{"mine": 1}')
    assert "is not a gantk generate manifest" in gen(exported["onnx"], out, "--count", "3", code=2).stderr
    manifest.unlink()
    manifest.mkdir()
    assert "is not a gantk generate manifest (not a file)" in gen(exported["onnx"], out, "--count", "3", code=2).stderr


def test_other_model_or_seed_needs_overwrite_and_foreign_files_survive(exported, tmp_path):
    out = tmp_path / "d"
    gen(exported["onnx"], out, "--count", "10", "--grid")
    (out / "notes.txt").write_text("mine")
    r = gen(exported["onnx"], out, "--count", "10", "--seed", "1", code=2)
    assert "seed" in r.stderr and "--overwrite" in r.stderr
    r = gen(exported["onnx"], out, "--count", "4", "--seed", "1", "--overwrite")
    assert f"{out / 'grid.png'} is the replaced output's contact sheet, left as it is" in r.stderr
    assert sorted(pngs(out)) == [f"{i:06d}.png" for i in range(4)]
    assert (out / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"
    gen(exported["onnx"], fresh, "--count", "4", "--seed", "1")
    assert pngs(out) == pngs(fresh)


def test_file_gantk_did_not_write_is_never_overwritten(exported, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "000003.png").write_bytes(b"a user's picture")
    r = gen(exported["onnx"], out, "--count", "10", code=2)
    assert "000003.png" in r.stderr and "not written by gantk" in r.stderr
    assert (out / "000003.png").read_bytes() == b"a user's picture"
    assert sorted(p.name for p in out.iterdir()) == ["000003.png"]


def test_overwrite_keeps_files_no_manifest_vouches_for(exported, tmp_path):
    out = tmp_path / "d"
    gen(exported["onnx"], out, "--count", "6")
    (out / "000002.png").write_bytes(b"edited by hand")      # was gantk's, no longer its bytes
    (out / "000008.png").write_bytes(b"a user's picture")    # never gantk's, inside the new range
    r = gen(exported["onnx"], out, "--count", "10", "--seed", "1", "--overwrite", code=2)
    assert "the manifest of the output --overwrite replaces does not list it with these bytes" in r.stderr
    assert (out / "000002.png").read_bytes() == b"edited by hand"
    assert (out / "000008.png").read_bytes() == b"a user's picture"


@pytest.mark.parametrize("fmt, name", [("png", "000025.png"), ("npy", "images-000000-000030.npy")])
def test_a_users_file_in_a_folder_gantk_writes_to_is_kept(exported, tmp_path, fmt, name):
    out = tmp_path / "d"
    gen(exported["onnx"], out, "--count", "20", "--format", fmt)
    (out / name).write_bytes(b"mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = gen(exported["onnx"], out, "--count", "30", "--format", fmt, code=2)
    assert f"{out / name} exists, no manifest lists it and it is not" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not a file written, nor the manifest


def test_unrecorded_images_of_this_run_are_kept_or_written_again_and_others_refused(exported, tmp_path):
    from PIL import Image

    ref, out = tmp_path / "ref", tmp_path / "d"
    gen(exported["onnx"], ref, "--count", "20")
    gen(exported["onnx"], out, "--count", "20")
    doc = json.loads((out / "manifest.json").read_text())
    doc["files"] = [f for f in doc["files"] if f["index"] < 15]  # as a killed run leaves it
    (out / "manifest.json").write_text(json.dumps(doc))
    Image.open(out / "000017.png").save(out / "000017.png")  # the same pixels, another encoder's bytes
    px = np.asarray(Image.open(out / "000018.png")).copy()
    px[0, 0] ^= 1  # one level off: as another device computes it
    Image.fromarray(px).save(out / "000018.png")
    r = gen(exported["onnx"], out, "--count", "20", "--json")
    assert (json.loads(r.stdout)["unchanged"], json.loads(r.stdout)["written"]) == (18, 2)
    assert pngs(out) == pngs(ref)
    (out / "manifest.json").write_text(json.dumps(doc))
    Image.fromarray(255 - px).save(out / "000018.png")  # another image
    r = gen(exported["onnx"], out, "--count", "20", code=2)
    assert "000018.png exists, no manifest lists it and it is not image 18 of this model and seed" in r.stderr


def test_a_folder_where_an_image_goes_is_exit_2(exported, tmp_path):
    out = tmp_path / "d"
    gen(exported["onnx"], out, "--count", "5")
    (out / "000003.png").unlink()
    (out / "000003.png").mkdir()  # listed in the manifest, now a folder
    r = gen(exported["onnx"], out, "--count", "5", code=2)
    assert f"{out / '000003.png'} is a folder, where image 3 goes" in r.stderr


def test_overwrite_keeps_an_array_no_manifest_vouches_for(exported, tmp_path):
    out = tmp_path / "d"
    gen(exported["onnx"], out, "--count", "10", "--format", "npy")
    gen(exported["onnx"], out, "--count", "10", "--format", "npy", "--seed", "1", "--overwrite")  # was gantk's
    assert "images-000000-000010.npy" in json.loads((out / "manifest.json").read_text())["arrays"][0]["file"]
    gen(exported["onnx"], tmp_path / "p", "--count", "10")
    mine = tmp_path / "p" / "images-000000-000010.npy"
    np.save(mine, np.full((3, 3), 7, np.uint8))
    r = gen(exported["onnx"], tmp_path / "p", "--count", "10", "--format", "npy", "--overwrite", code=2)
    assert f"{mine} exists and the manifest of the output --overwrite replaces does not list it" in r.stderr
    assert np.load(mine).tolist() == [[7] * 3] * 3


@pytest.mark.parametrize("name", ["summary.json", "grid.png"])
def test_a_fresh_folder_with_gantk_file_names_is_refused(exported, tmp_path, name):
    out = tmp_path / "d"
    out.mkdir()
    (out / name).write_text("the user's")
    r = gen(exported["onnx"], out, "--count", "4", "--grid", code=2)
    assert name in r.stderr and (out / name).read_text() == "the user's"
    assert sorted(p.name for p in out.iterdir()) == [name]


@pytest.mark.parametrize("name", ["summary.json", "grid.png"])
def test_a_users_file_of_a_gantk_name_in_a_claimed_folder_is_refused_and_gantks_own_replaced(exported, tmp_path,
                                                                                                 name):
    """No manifest records the summary or the grid: their content tells gantk's from the user's."""
    out = tmp_path / "d"
    gen(exported["onnx"], out, "--count", "4", "--grid")
    ours = (out / name).read_bytes()
    gen(exported["onnx"], out, "--count", "6", "--grid")  # gantk's own: replaced by this run's
    assert (out / name).read_bytes() != ours
    (out / name).write_text("the user's")
    r = gen(exported["onnx"], out, "--count", "8", "--grid", code=2)
    assert f"{out / name} exists and was not written by gantk" in r.stderr and (out / name).read_text() == "the user's"
    assert not (out / "000007.png").exists()


def test_a_contact_sheet_drawn_before_the_mark_is_gantks(exported, tmp_path):
    from gantk.generate import GRID, _our_grid, encode_png

    sheet = np.zeros((2 * 34 + 2, 8 * 34 + 2), np.uint8)
    sheet[2:34, 2:34] = 200
    (tmp_path / GRID).write_bytes(encode_png(sheet))
    assert _our_grid(tmp_path / GRID)
    sheet[0, 5] = 1  # not the frame of gantk's sheets
    (tmp_path / GRID).write_bytes(encode_png(sheet))
    assert not _our_grid(tmp_path / GRID)


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("change", [0.5, np.nan])  # NaN must fail, not compare False
def test_perturbed_model_fails_parity_before_writing(exported, tmp_path, change):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(exported["onnx"]))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += change
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    r = gen(bad, tmp_path / "out", "--count", "50", code=4)
    assert "parity failed" in r.stderr and "max abs diff" in r.stderr
    assert not (tmp_path / "out").exists()


def test_no_reference_requires_no_parity(exported, tmp_path):
    import shutil

    import onnx

    model = onnx.load(str(exported["onnx"]))
    for p in model.metadata_props:
        if p.key == "source_checkpoint":
            p.value = str(tmp_path / "gone.pt")
    lost = tmp_path / "lost.onnx"
    onnx.save(model, str(lost))
    r = gen(lost, tmp_path / "a", "--count", "5", code=2)
    assert "no parity reference" in r.stderr and "--no-parity" in r.stderr and not (tmp_path / "a").exists()
    doc = json.loads(gen(lost, tmp_path / "a", "--count", "5", "--no-parity", "--json").stdout)
    assert doc["parity"]["status"] == "skipped"
    doc = json.loads(gen(lost, tmp_path / "b", "--count", "5", "--reference", str(exported["ckpt"]), "--json").stdout)
    assert doc["parity"]["status"] == "passed" and doc["parity"]["max_abs_diff"] < 1e-4
    other = tmp_path / "other.pt"
    shutil.copy(exported["ckpt"], other)
    with open(other, "ab") as f:
        f.write(b"\0")
    r = gen(lost, tmp_path / "c", "--count", "5", "--reference", str(other), code=2)
    assert "sha256" in r.stderr


def test_parity_finds_the_numbered_copy_of_a_source_that_trained_on(tmp_path):
    from gantk.config import TrainConfig
    from gantk.exporters import EXPORTERS
    from gantk.train import train

    cfg = TrainConfig(data="synthetic", data_count=64, epochs=1, arch="seed")
    run = Path(train(cfg, runs_dir=tmp_path)["run_dir"])
    last = run / "checkpoints" / "last.pt"
    EXPORTERS["onnx"](last, run / "export" / "generator.onnx")
    train(cfg.replace(epochs=2), runs_dir=tmp_path, resume=last)  # last.pt moves on; step-00000002.pt stays
    doc = json.loads(gen(run / "export" / "generator.onnx", tmp_path / "o", "--count", "5", "--json").stdout)
    assert doc["parity"]["status"] == "passed" and "step-00000002.pt" in doc["parity"]["reference"]


def test_parity_reads_the_numbered_copy_where_training_replaces_last_pt_as_it_is_picked(tmp_path, monkeypatch):
    """find_reference picks last.pt by its sha256, then training saves over it before it is loaded."""
    import gantk.generate as G
    from gantk import checkpoint
    from gantk.config import TrainConfig
    from gantk.exporters import EXPORTERS
    from gantk.train import train

    run = Path(train(TrainConfig(data="synthetic", data_count=64, epochs=1, arch="seed"), runs_dir=tmp_path)["run_dir"])
    last = run / "checkpoints" / "last.pt"
    EXPORTERS["onnx"](last, run / "export" / "generator.onnx")
    state = checkpoint.load(last)
    moved_on = {**state, "step": 4, "ema": {k: v + 0.05 if v.is_floating_point() else v for k, v in state["ema"].items()}}
    real, picks = G.find_reference, []

    def pick_then_training_saves(*a):
        picks.append(real(*a)[0])
        if len(picks) == 1:
            checkpoint.save(moved_on, last)
        return picks[-1], "note"

    monkeypatch.setattr(G, "find_reference", pick_then_training_saves)
    doc = json.loads(gen(run / "export" / "generator.onnx", tmp_path / "o", "--count", "5", "--json").stdout)
    assert picks == [last, run / "checkpoints" / "step-00000002.pt"] and doc["parity"]["status"] == "passed"


def test_more_writers_than_cores_is_warned(exported, tmp_path):
    from gantk.backends import cores

    r = gen(exported["onnx"], tmp_path / "o", "--count", "5", "--writers", str(cores() + 7))
    assert f"--writers {cores() + 7} on {cores()} cores: more workers than cores" in r.stderr


def test_parity_indices_spread_over_the_range():
    idx = parity_indices(Request(out=Path("x"), start=100, count=1000, parity_samples=5))
    assert idx[0] == 100 and idx[-1] == 1099 and len(idx) == 5
    assert all(i % 4 == 1 for i in parity_indices(Request(out=Path("x"), count=50, shard=(1, 4))))


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args, needle", [
    (["--count", "0"], "--count"), (["--count", "-3"], "--count"), (["--count", "many"], "many"),
    (["--batch-size", "0"], "--batch-size"), (["--start", "-1"], "--start"), (["--shard", "3/3"], "shard"),
    (["--shard", "x"], "shard"), (["--seed", "-1"], "--seed"), (["--streams", "0"], "--streams"),
    (["--threads", "-2"], "--threads"), (["--streams", "2", "--backend", "torchscript"], "--streams"),
    (["--atol", "-1"], "--atol"), (["--atol", "nan"], "--atol"), (["--no-parity", "--reference", "x.pt"], "--reference"),
    (["--backend", "torch", "--reference", "x.pt"], "drop --reference"),
    (["--count", str(10**14)], "PNGs need about"), (["--count", str(10**14), "--format", "npy"], "in memory"),
    (["--out", ""], "'--out': is empty"),  # not the current folder
])
def test_bad_numbers_exit_2_and_write_nothing(exported, tmp_path, args, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = gen(exported["onnx"], tmp_path / "out", *args, code=2)
    assert needle in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("frsize, free, files, favail, fits", [
    (1 << 20, 20e9, 10**7, 10**6, True),    # NFS/CephFS report their transfer size as the block size
    (4096, 20e9, 0, 0, True),               # no inode figures (btrfs)
    (4096, 1e6, 10**7, 10**6, False),       # 10,000 4-KiB files do not fit in 1 MB
    (4096, 20e9, 10**7, 500, False),        # nor in 500 inodes
    (4096, 20e9, 10**7, 0, False),          # nor in none
])
def test_the_room_check_refuses_only_what_cannot_fit(tmp_path, monkeypatch, frsize, free, files, favail, fits):
    from gantk.generate import check_room

    stat = os.statvfs_result((frsize, frsize, 10**9, int(free // frsize), int(free // frsize), files, favail,
                              favail, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda path: stat)
    req = Request(out=tmp_path / "o", count=10000)
    if fits:
        check_room(req, tmp_path / "o", 0)
    else:
        with pytest.raises(UsageError, match="PNGs need"):
            check_room(req, tmp_path / "o", 0)
    check_room(req, tmp_path / "o", 10000)  # all there already: a re-run needs no room


def test_non_gantk_models_exit_2(exported, tmp_path):
    import onnx

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(300))
    assert "not a loadable ONNX model" in gen(junk, tmp_path / "o", "--count", "3", code=2).stderr
    model = onnx.load(str(exported["onnx"]))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    assert "not a gantk export" in gen(bare, tmp_path / "o", "--count", "3", code=2).stderr
    assert "is not a PyTorch file" in gen(junk, tmp_path / "o", "--backend", "torchscript", code=2).stderr
    assert "model not found" in gen(tmp_path / "nope.onnx", tmp_path / "o", code=2).stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model, args, needle", [
    ("ckpt", [], "is a PyTorch checkpoint, not an ONNX model; pass --backend torch"),
    ("pt", [], "is a TorchScript export, not an ONNX model; pass --backend torchscript"),
    ("ckpt", ["--backend", "torchscript"], "pass --backend torch"),
    ("onnx", ["--backend", "torch"], "an ONNX model takes --backend onnxruntime"),
    ("truncated", [], "cut short or corrupt"), ("truncated", ["--backend", "torch"], "cut short or corrupt"),
    ("empty", [], "empty file"),
    ("damaged", ["--backend", "torchscript"], "a damaged TorchScript file ("),
    ("damaged_ckpt", ["--backend", "torch"], "a damaged gantk checkpoint ("),
])
def test_a_model_file_of_another_kind_is_named_with_the_backend_that_takes_it(exported, tmp_path, damage, model,
                                                                                 args, needle):
    files = dict(exported, truncated=tmp_path / "cut.pt", empty=tmp_path / "empty.onnx",
                 damaged=damage(exported["pt"], tmp_path / "damaged.pt"),
                 damaged_ckpt=damage(exported["ckpt"], tmp_path / "damaged-ckpt.pt"))
    files["truncated"].write_bytes(exported["ckpt"].read_bytes()[:5000])
    files["empty"].write_bytes(b"")
    r = gen(files[model], tmp_path / "o", *args, code=2)
    assert needle in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unavailable_provider_exit_2(exported, tmp_path, monkeypatch):
    import torch

    from gantk import backends

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    for p in ("cuda", "tensorrt"):
        r = gen(exported["onnx"], tmp_path / "o", "--provider", p, "--count", "3", code=2)
        assert f"provider {p} requested" in r.stderr and "CUDA" in r.stderr
    monkeypatch.setattr(backends, "NVIDIA_GPUS", str(tmp_path / "gpus"))  # a machine without a GPU: quiet
    r = gen(exported["onnx"], tmp_path / "o", "--provider", "auto", "--count", "3", "--json")
    assert json.loads(r.stdout)["provider"] == "cpu" and r.stderr == ""
    (tmp_path / "gpus" / "0000:01:00.0").mkdir(parents=True)  # one the driver sees but CUDA cannot use: said
    r = gen(exported["onnx"], tmp_path / "o2", "--provider", "auto", "--count", "3", "--json")
    doc = json.loads(r.stdout)
    assert doc["provider"] == "cpu" and "running on the CPU" in r.stderr and doc["warnings"]


def test_no_parity_on_a_machine_without_gpu_never_imports_torch(exported, tmp_path):
    """torch takes about 2 s to import; an onnxruntime run without a parity check has no use for it."""
    from gantk import backends

    if not backends.no_nvidia_gpu():
        pytest.skip("an NVIDIA GPU is visible here")
    code = ("import sys; from gantk.cli import cli; cli(sys.argv[1:], prog_name='gantk', standalone_mode=False); "
            "print('torch' in sys.modules)")
    args = ["generate", "--model", str(exported["onnx"]), "--out", str(tmp_path / "o"), "--count", "3", "-q"]
    out = subprocess.run([sys.executable, "-c", code, *args, "--no-parity"], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False"] and len(pngs(tmp_path / "o")) == 3
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"]  # the parity check's eager reference


def test_out_is_a_file_exit_2_and_read_only_exit_1(exported, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "existing file" in gen(exported["onnx"], f, "--count", "3", code=2).stderr
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert "is a link to" in gen(exported["onnx"], tmp_path / "dangling", "--count", "3", code=2).stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    target = ro / "digits"
    if os.geteuid() == 0:  # root writes through 0o555; sysfs refuses even root
        target = Path("/sys/kernel/gantk-digits")
        if not Path("/sys/kernel").is_dir() or os.access("/sys/kernel", os.W_OK) and _can_create("/sys/kernel"):
            pytest.skip("no read-only folder available")
    r = gen(exported["onnx"], target, "--count", "3", code=1)
    assert str(target) in r.stderr and "not writable" in r.stderr
    if os.geteuid() != 0:
        r = gen(exported["onnx"], ro, "--count", "3", code=1)
        assert str(ro) in r.stderr and not list(ro.iterdir())


def test_default_model_is_newest_runs_export(exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["generate", "--runs-dir", str(exported["runs"]), "--count", "3", "--out", "d"])
    assert r.exit_code == 0, r.output
    assert f"model: {exported['onnx']}" in r.stderr and "parity passed" in r.stderr
    assert len(pngs(tmp_path / "d")) == 3
    empty = tmp_path / "noruns"
    r = CliRunner().invoke(cli, ["generate", "--runs-dir", str(empty), "--count", "3"])
    assert r.exit_code == 2 and "gantk train" in r.stderr


def _can_create(folder: str) -> bool:
    try:
        with open(os.path.join(folder, ".gantk-probe"), "wb"):
            pass
    except OSError:
        return False
    os.unlink(os.path.join(folder, ".gantk-probe"))
    return True


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_iobinding_parity_and_determinism(exported, tmp_path, provider):
    import onnxruntime as ort

    ep = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    if ep not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime ({ort.__version__}) has no {ep}")
    args = ["--provider", provider, "--count", "600", "--json"]
    r = CliRunner().invoke(cli, ["generate", "--model", str(exported["onnx"]), "--out", str(tmp_path / "a"),
                                 "-q", *args, "--batch-size", "256"])
    if provider == "tensorrt" and r.exit_code == 2:
        pytest.skip(f"TensorRT did not load: {r.stderr.strip()[-200:]}")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["provider"] == provider and doc["settings"]["fixed_batch"] == 256
    assert doc["parity"]["status"] == "passed"
    split = ["--provider", provider, "--batch-size", "256"]
    gen(exported["onnx"], tmp_path / "b", *split, "--count", "250")  # other positions in the fixed batch
    gen(exported["onnx"], tmp_path / "b", *split, "--start", "250", "--count", "350")
    assert pngs(tmp_path / "a") == pngs(tmp_path / "b")
    gen(exported["onnx"], tmp_path / "c", "--provider", provider, "--count", "600", "--batch-size", "64")
    gen(exported["onnx"], tmp_path / "cpu", "--provider", "cpu", "--count", "600")
    a = pngs(tmp_path / "a")
    assert pngs(tmp_path / "c") == a  # another --batch-size: the same compute shape (GPU_BATCH)
    same = sum(a[n] == b for n, b in pngs(tmp_path / "cpu").items())  # another device: parity-level
    print(f"{provider}: {same}/600 PNGs byte-identical to the CPU's")
    assert same >= 570


@pytest.mark.gpu
def test_gpu_torch_backend_fixed_batch_split_invariant(exported, tmp_path):
    args = ["--backend", "torch", "--provider", "cuda", "--batch-size", "128"]
    doc = json.loads(gen(exported["ckpt"], tmp_path / "a", *args, "--count", "300", "--json").stdout)
    assert doc["provider"] == "cuda" and doc["settings"]["fixed_batch"] == 256  # GPU_BATCH, whatever --batch-size
    gen(exported["ckpt"], tmp_path / "b", *args, "--count", "100")
    gen(exported["ckpt"], tmp_path / "b", *args[:-1], "7", "--start", "100", "--count", "200")
    assert pngs(tmp_path / "a") == pngs(tmp_path / "b")
    gen(exported["ckpt"], tmp_path / "cpu", "--backend", "torch", "--provider", "cpu", "--count", "300")
    same = sum(pngs(tmp_path / "a")[n] == b for n, b in pngs(tmp_path / "cpu").items())
    print(f"torch cuda vs cpu: {same}/300 PNGs byte-identical")
    assert same >= 285


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_torchscript_exports_run_on_cuda(exported, tmp_path, dtype):
    """A frozen module's weights are constants: the backend must load them onto the GPU, not .to() them."""
    from gantk.exporters import EXPORTERS

    model = exported["pt"] if dtype == "fp32" else tmp_path / "g-bf16.pt"
    if dtype == "bf16":
        EXPORTERS["torchscript"](exported["ckpt"], model, dtype="bf16")
    args = ["--backend", "torchscript", "--count", "300"]
    doc = json.loads(gen(model, tmp_path / "a", *args, "--provider", "cuda", "--json").stdout)
    assert doc["provider"] == "cuda" and doc["parity"]["status"] == "passed"
    gen(model, tmp_path / "cpu", *args, "--provider", "cpu")
    a, cpu = pngs(tmp_path / "a"), pngs(tmp_path / "cpu")
    same = sum(a[n] == b for n, b in cpu.items())
    print(f"torchscript {dtype} cuda vs cpu: {same}/300 PNGs byte-identical")
    if dtype == "fp32":
        assert same >= 285
        return
    # bf16 rounds after every layer, and cuDNN and oneDNN round different sums: nearly every image differs
    # somewhere (16/300 identical on an H200, 0.27% of pixels off by 1 level). Both pass generate's parity
    # check (bf16's tolerance against fp32 on its samples), so they may differ by twice that, in few pixels.
    from gantk.exporters.validate import TOLERANCE

    levels = np.stack([_levels(a[n]) - _levels(b) for n, b in cpu.items()])
    off = np.abs(levels)
    print(f"torchscript bf16 cuda vs cpu: {np.mean(off > 0):.2%} of pixels off, at most {off.max()} levels")
    assert off.max() <= 2 * math.ceil(TOLERANCE["bf16"] * 127.5) + 1 and np.mean(off > 0) <= 0.02


def test_default_writers_follow_the_cores_this_process_may_use(monkeypatch):
    from gantk import generate as generate_mod

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert generate_mod.default_writers(4) == generate_mod.MAX_WRITERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 ranks share the node's 64 cores
    assert generate_mod.default_writers(4) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert generate_mod.default_writers(1) == 2


def test_workers_are_threads_where_processes_cannot_be(monkeypatch):
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from gantk import generate as generate_mod

    with generate_mod.executor(2, 10) as small:
        assert isinstance(small, ThreadPoolExecutor)
    with generate_mod.executor(2, generate_mod.PROCESS_MIN_IMAGES) as big:
        assert isinstance(big, ProcessPoolExecutor)
    monkeypatch.setattr(generate_mod.sys, "platform", "darwin")
    with generate_mod.executor(2, generate_mod.PROCESS_MIN_IMAGES) as elsewhere:
        assert isinstance(elsewhere, ThreadPoolExecutor)


def test_one_writer_gets_two_batches_of_png_work_before_inference_waits(tmp_path):
    """With a queue shorter than one batch, inference waited for the writer after every batch."""
    from concurrent.futures import Future

    from gantk import generate as generate_mod

    class LazyPool:  # noise runs at once; PNG tasks run only when inference waits for one
        def __init__(self):
            self.png_tasks, self.queued_at_first_wait = 0, None

        def submit(self, fn, *args):
            if fn is not generate_mod._write_chunk:
                fut = Future()
                fut.set_result(fn(*args))
                return fut
            self.png_tasks += 1
            pool, fut = self, Future()

            def result(timeout=None):
                if not fut.done():
                    if pool.queued_at_first_wait is None:
                        pool.queued_at_first_wait = pool.png_tasks
                    fut.set_result(fn(*args))
                return Future.result(fut)
            fut.result = result
            return fut

    backend = lambda z: np.zeros((len(z), 1, 32, 32), np.float32)  # noqa: E731
    backend.latent_shape = (1, 6, 6)
    req = Request(out=tmp_path, count=1024, batch_size=256, writers=1)
    pool = LazyPool()
    generate_mod.write_pngs(backend, req, generate_mod.Folder(tmp_path, {}), list(range(1024)), pool,
                            lambda ev: None, generate_mod.Timing())
    assert pool.queued_at_first_wait > 2 * 256 // generate_mod.CHUNK  # was 8: right after the first batch
    assert len(list(tmp_path.glob("*.png"))) == 1024

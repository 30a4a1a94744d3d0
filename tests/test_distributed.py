"""torchrun: 2 CPU processes over Gloo for training (DDP) and generation, against one process."""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gantk import checkpoint as ckpt
from gantk.cli import cli

TRAIN = ["train", "--data", "synthetic", "--data-count", "256", "--arch", "seed", "--epochs", "2",
         "--checkpoint-every", "1", "--keep", "20", "--log-every", "1", "--runs-dir", "runs"]


def torchrun(cwd: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m gantk -- ARGS` (the `--` keeps torchrun's own
    option parser away from gantk's flags such as --run and --start)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "gantk", "--", *args]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0 and "terminate called without an active exception" in p.stderr:
        # Seen once in ~20 runs on a heavily loaded machine, never reproduced: a worker aborting in
        # Gloo's C++ threads. One more try, so that only a repeatable failure fails the test (a new
        # run's folder goes first; a resume or a generate simply continues).
        if "--run" in args and "--resume" not in args:
            shutil.rmtree(cwd / "runs" / args[args.index("--run") + 1], ignore_errors=True)
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def weights(path: Path) -> dict:
    s = ckpt.load(path)
    return {k: s[k] for k in ("generator", "discriminator", "ema")} | {"step": s["step"]}


def same(a: dict, b: dict) -> bool:
    return a["step"] == b["step"] and all(torch.equal(a[k][n], b[k][n])
                                          for k in ("generator", "discriminator", "ema") for n in a[k])


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """A straight 2-process run, and one stopped at step 3 then resumed with 2 processes."""
    cwd = tmp_path_factory.mktemp("ddp")
    p = torchrun(cwd, *TRAIN, "--run", "straight", "--json")
    (cwd / "straight.json").write_text(p.stdout)
    torchrun(cwd, *TRAIN, "--run", "cut", "--max-steps", "3")
    torchrun(cwd, "train", "--resume", "runs/cut", "--runs-dir", "runs")
    return cwd


def test_ranks_hold_identical_weights_after_every_step(ddp_runs):
    ckpts = sorted((ddp_runs / "runs" / "straight" / "checkpoints").glob("step-*.pt"))
    assert len(ckpts) == 8  # one per step (256 images / (32 x 2 ranks) = 4 steps an epoch)
    for path in ckpts:
        sums = ckpt.load(path)["rank_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1], path.name


def test_only_rank_0_writes_and_reports(ddp_runs):
    assert sorted(p.name for p in (ddp_runs / "runs").iterdir()) == ["cut", "straight"]
    summary = json.loads((ddp_runs / "straight.json").read_text())  # exactly one JSON document
    assert summary["world_size"] == 2 and summary["global_batch"] == 64 and summary["steps"] == 8
    rows = (ddp_runs / "runs" / "straight" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 9)]
    info = json.loads(CliRunner().invoke(cli, ["info", str(ddp_runs / "runs" / "straight"), "--json"]).stdout)
    assert (info["world_size"], info["global_batch"], info["compute_dtype"]) == (2, 64, "fp32")


def test_resumed_two_process_run_equals_an_uninterrupted_one(ddp_runs):
    a = weights(ddp_runs / "runs" / "straight" / "checkpoints" / "last.pt")
    b = weights(ddp_runs / "runs" / "cut" / "checkpoints" / "last.pt")
    assert same(a, b)


def test_a_two_process_checkpoint_resumes_in_one_process(ddp_runs, tmp_path):
    import shutil

    from gantk.config import TrainConfig
    from gantk.train import train

    run = tmp_path / "single"
    shutil.copytree(ddp_runs / "runs" / "straight", run)
    s = train(TrainConfig(data="synthetic", data_count=256, arch="seed", epochs=3),
              resume=run / "checkpoints" / "last.pt")
    assert s["world_size"] == 1 and s["steps"] == 8 + 8  # epoch 3 alone: 256 / 32 steps
    assert ckpt.load(run / "checkpoints" / "last.pt")["world_size"] == 1


def test_generation_over_ranks_and_shards_equals_one_process(ddp_runs, tmp_path):
    cwd = ddp_runs
    run = CliRunner().invoke
    assert run(cli, ["export", "--checkpoint", str(cwd / "runs" / "straight"), "--out",
                     str(tmp_path / "g.onnx")]).exit_code == 0
    common = ["generate", "--model", str(tmp_path / "g.onnx"), "--count", "150", "--start", "10"]
    one = run(cli, [*common, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    for k in range(3):
        r = run(cli, [*common, "--out", str(tmp_path / "shards"), "--shard", f"{k}/3"])
        assert r.exit_code == 0, r.output
    torchrun(tmp_path, *common, "--out", str(tmp_path / "ranks"))
    for other in ("shards", "ranks"):
        cmp = filecmp.dircmp(tmp_path / "one", tmp_path / other, ignore=["summary.json"])
        assert not cmp.left_only and not cmp.right_only and not cmp.diff_files, other
        names = [n for n in os.listdir(tmp_path / "one") if n.endswith(".png") or n == "manifest.json"]
        assert len(names) == 151
        for n in names:
            assert (tmp_path / "one" / n).read_bytes() == (tmp_path / other / n).read_bytes(), (other, n)


def test_a_request_that_leaves_a_rank_no_image_is_refused_by_every_rank(ddp_runs, tmp_path):
    run = CliRunner().invoke
    assert run(cli, ["export", "--checkpoint", str(ddp_runs / "runs" / "straight"), "--out",
                     str(tmp_path / "g.onnx")]).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "gantk", "--", "generate", "--model", str(tmp_path / "g.onnx"), "--count", "1",
                        "--start", "5", "--out", str(tmp_path / "o")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0 and not (tmp_path / "o").exists()
    lines = [x for x in p.stderr.splitlines() if x.startswith("gantk:")]
    assert lines == ["gantk: error: --count 1 from --start 5 leaves rank 0 of 2 no image; generate it in one "
                     "process, or ask for at least 2"] * 2, p.stderr[-2000:]


def test_a_rank_that_lost_its_peer_says_so_not_internal_error(monkeypatch, tmp_path):
    import gantk.train

    def lost(*a, **k):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    monkeypatch.setattr(gantk.train, "train", lost)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r = CliRunner().invoke(cli, ["train", "--data", "synthetic", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 1 and r.stderr.strip() == ("gantk: error: rank 1 lost another rank of the job (that "
                                                     "rank's own error, or torchrun's report, says why)"), r.output


def test_ranks_launched_with_other_options_are_refused_not_left_waiting(tmp_path):
    """As when each node runs its own command: rank 1 with another --max-steps."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, steps in ((0, "5"), (1, "9")):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-m", "gantk", *TRAIN, "--run", "mixed", "--max-steps", steps],
                                      cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert "the ranks were launched with other max_steps (rank values: [5, 9])" in err


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_training_on_two_gpus(tmp_path):
    p = torchrun(tmp_path, *TRAIN, "--device", "cuda", "--run", "nccl", "--json")
    assert json.loads(p.stdout)["device"] == "cuda:0"
    sums = ckpt.load(tmp_path / "runs" / "nccl" / "checkpoints" / "last.pt")["rank_checksums"]
    assert sums[0] == sums[1]

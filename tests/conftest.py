"""Shared fixtures: a small synthetic run, and the `gpu` marker that skips without CUDA."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GANTK_CACHE", str(Path(__file__).parent / ".cache-never-used"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GANTK_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny dcgan run on synthetic digits: runs/<run>/ with checkpoints, for tests that need one."""
    from gantk.config import TrainConfig
    from gantk.train import train

    runs = tmp_path_factory.mktemp("runs")
    summary = train(TrainConfig(data="synthetic", data_count=128, epochs=1, log_every=2), runs_dir=runs)
    return Path(summary["run_dir"])


@pytest.fixture
def damage():
    """damage(src, dst): dst is a copy of the PyTorch zip src with one byte flipped inside its largest
    member's data (a weight), the archive otherwise intact."""
    import zipfile

    def flip(src: Path, dst: Path) -> Path:
        with zipfile.ZipFile(src) as z:
            big = max(z.infolist(), key=lambda i: i.file_size)
        data = bytearray(src.read_bytes())
        name_len, extra_len = (int.from_bytes(data[big.header_offset + o:big.header_offset + o + 2], "little")
                               for o in (26, 28))  # the local header's own lengths
        data[big.header_offset + 30 + name_len + extra_len + big.file_size // 2] ^= 0xFF
        dst.write_bytes(bytes(data))
        return dst

    return flip

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


def _default_signals() -> None:
    """In a child process: SIGINT and SIGTERM as a shell gives them to a command it starts (a test run
    launched in the background inherits SIGINT ignored, and Python then keeps it ignored)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(autouse=True, scope="session")
def _interactive_sigint():
    """The test process as an interactive one: a suite launched in the background inherits SIGINT ignored,
    which gantk (as Python itself) then leaves ignored, so the in-process signal tests would send in vain."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture
def default_signals():
    """A `preexec_fn` that starts a child with SIGINT and SIGTERM at their defaults."""
    return _default_signals


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
    """damage(src, dst, where="data"): dst is a copy of the PyTorch zip src with one byte flipped inside its
    largest member's data (a weight: torch.load would read it), or, with where="header", in the last
    member's local header (its extra field's length), the archive otherwise intact."""
    import zipfile

    def flip(src: Path, dst: Path, where: str = "data") -> Path:
        with zipfile.ZipFile(src) as z:
            infos = z.infolist()
        data = bytearray(src.read_bytes())
        if where == "header":
            data[infos[-1].header_offset + 29] ^= 0xFF
        else:
            big = max(infos, key=lambda i: i.file_size)
            at = big.header_offset
            name_len, extra_len = (int.from_bytes(data[at + o:at + o + 2], "little") for o in (26, 28))
            data[at + 30 + name_len + extra_len + big.file_size // 2] ^= 0xFF
        dst.write_bytes(bytes(data))
        return dst

    return flip

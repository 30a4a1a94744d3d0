"""The training loop: exact resume, clean stops on SIGINT/SIGTERM, divergence detection.

`train(config, ...)` runs one run folder:
  runs/<run>/config.json, checkpoints/{last.pt,step-*.pt,best.pt}, samples/{epoch-*,step-*,latest}.png,
  metrics.csv, loss.png
Progress goes to an optional callback; nothing is printed.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import shlex
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import data as data_mod
from . import distributed, models
from .backends import native_bf16
from .config import TrainConfig
from .errors import (CheckpointError, DamagedFileError, DataError, DivergedError, GantkError, Interrupted,
                     UsageError, handling, ignore_stops)

log = logging.getLogger("gantk.train")

EVAL_METRICS = ["fid", "kid", "precision", "recall", "class_entropy", "recognised", "confidence"]
METRICS = ["step", "epoch", "loss_d", "loss_g", "d_x", "d_g_z", "img_per_s", "elapsed_s", *EVAL_METRICS]
GRID = 100  # samples per grid, 10x10


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available (torch "
                         f"{torch.__version__}, {torch.cuda.device_count()} devices); use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {name!r} (choose auto, cpu or cuda)")
    return torch.device(name)


def epoch_order(seed: int, epoch: int, n: int, world: distributed.World = distributed.World()) -> torch.Tensor:
    """This rank's share of one epoch's data order: a function of (seed, epoch, rank, world size) only,
    so a resume can replay it. A `DistributedSampler`, as torchrun users expect, also for one process."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world.size, rank=world.rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def fixed_noise(latent_shape: tuple[int, ...], seed: int, count: int = GRID) -> torch.Tensor:
    return torch.randn((count, *latent_shape), generator=torch.Generator().manual_seed(seed + 1))


class _Batches(torch.utils.data.Dataset):
    """`ds[index_tensor]` gathers a whole batch at once from the in-memory images."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]


class Trainer:
    """G, D, their EMA, optimizers, scaler and RNGs: everything a checkpoint holds."""

    def __init__(self, config: TrainConfig, device: torch.device, world: distributed.World = distributed.World()):
        if config.amp is None:
            raise ValueError("config.amp is unresolved: train() picks it (default_amp)")
        self.config, self.device, self.world = config, device, world
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
        g, d = models.build(config.arch, spectral_norm=config.spectral_norm)
        self.g, self.d = g.to(device), d.to(device)
        self.ema = models.ema_copy(self.g) if config.ema_decay > 0 else None
        betas = (config.beta1, config.beta2)
        self.opt_g = torch.optim.Adam(self.g.parameters(), config.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), config.lr_d, betas=betas)
        self.scaler = torch.amp.GradScaler("cuda") if config.amp and device.type == "cuda" else None
        self.noise = torch.Generator(device)
        self.g_run, self.d_run = self._parallel(self.g), self._parallel(self.d)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.elapsed = 0.0
        self.images_seen = 0
        self.best_fid = float("inf")
        self.fid_reference: str | None = None  # best_fid's yardstick: evaluate.Reference.key and eval count
        self.meter = _Meter()
        self.last_figures: dict[str, float] = {}

    def _parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel under torchrun (SyncBatchNorm first if asked), the module itself otherwise."""
        if not self.world.active:
            return module
        if self.config.sync_bn:
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    @property
    def dtype(self) -> str:
        if not self.config.amp:
            return "fp32"
        return "fp16 autocast" if self.device.type == "cuda" else "bf16 autocast"

    def _autocast(self):
        """Mixed precision: float16 with the gradient scaler on CUDA, bfloat16 (no scaler needed) on the CPU."""
        return torch.autocast(self.device.type, torch.float16 if self.device.type == "cuda" else torch.bfloat16)

    def noise_seed(self) -> int:
        """Noise of a step is a function of (seed, rank, step): a resume needs no generator state."""
        return ((self.config.seed * 1_000_003 + self.world.rank) * 1_000_000_007 + self.step) % 2**63

    @property
    def sampler(self) -> models.Generator:
        """The generator that samples and exports: the EMA copy when there is one, in eval mode."""
        return self.ema if self.ema is not None else self.g

    def _loss(self, logits: torch.Tensor, target: float) -> torch.Tensor:
        t = torch.full_like(logits, target, dtype=torch.float32)
        if self.config.loss == "bce":  # outside autocast, which refuses BCELoss on CUDA (fp32 here anyway)
            with torch.autocast(self.device.type, enabled=False):
                return F.binary_cross_entropy(torch.sigmoid(logits.float()), t)
        return F.binary_cross_entropy_with_logits(logits.float(), t)

    def train_step(self, x: torch.Tensor, *, stop: bool = False) -> dict[str, float]:
        """One D step on real + fake, one G step on the same fake batch; returns the step's figures
        (averaged over ranks) and `stop`: whether any rank was asked to stop."""
        cfg, n = self.config, x.shape[0]
        self.noise.manual_seed(self.noise_seed())
        z = torch.randn((n, *self.g.latent_shape), generator=self.noise, device=self.device)
        autocast = self._autocast() if cfg.amp else nullcontext()
        with autocast:
            fake = self.g_run(z)
            d_real, d_fake = self.d_run(x), self.d_run(fake.detach())
            loss_d = self._loss(d_real, cfg.label_smoothing) + self._loss(d_fake, 0.0)
        self.opt_d.zero_grad(set_to_none=True)
        self._backward_step(loss_d, self.opt_d)
        with autocast:
            d_gen = self.d_run(fake)
            loss_g = self._loss(d_gen, 1.0)
        self.opt_g.zero_grad(set_to_none=True)
        self._backward_step(loss_g, self.opt_g)
        if self.scaler is not None:
            self.scaler.update()
        if self.ema is not None:
            decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
            models.ema_update(self.ema, self.g, decay)
        figures = torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(d_real.detach().float()).mean(),
                               torch.sigmoid(d_fake.detach().float()).mean(),
                               torch.tensor(float(stop), device=loss_d.device)])
        figures = distributed.all_sum(self.world, figures).div_(self.world.size).tolist()
        if not all(np.isfinite(figures[:2])):
            raise DivergedError(f"training diverged at step {self.step + 1}: loss_d={figures[0]}, "
                                f"loss_g={figures[1]}; this step is not saved")
        self.step += 1
        self.images_seen += n * self.world.size
        self.last_figures = dict(zip(("loss_d", "loss_g", "d_x", "d_g_z"), figures))
        return {**self.last_figures, "stop": figures[4] > 0}

    def _backward_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)

    def state_dict(self, *, rank_checksums: list[float] | None = None) -> dict[str, Any]:
        cuda_rng = [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
        np_state = np.random.get_state()
        return {
            "format": ckpt.FORMAT, "kind": ckpt.KIND, "versions": ckpt.versions(),
            "config": self.config.to_dict(), "compute_dtype": self.dtype, "latent_shape": list(self.g.latent_shape),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "images_seen": self.images_seen, "elapsed_s": self.elapsed,
            "best_fid": self.best_fid, "fid_reference": self.fid_reference, "world_size": self.world.size,
            "rank_checksums": rank_checksums or [self.checksum()],
            "generator": self.g.state_dict(), "discriminator": self.d.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": {"python": _plain(random.getstate()),
                    "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
                    "torch": torch.get_rng_state(), "cuda": cuda_rng},
            "meter": self.meter.state_dict(),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        try:
            self.g.load_state_dict(s["generator"])
            self.d.load_state_dict(s["discriminator"])
            if self.ema is not None:
                self.ema.load_state_dict(s["ema"])
            self.opt_g.load_state_dict(s["opt_g"])
            self.opt_d.load_state_dict(s["opt_d"])
            if self.scaler is not None and s.get("scaler"):
                self.scaler.load_state_dict(s["scaler"])
            rng = s["rng"]
            random.setstate(_tuples(rng["python"]))
            np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], np.uint32), *rng["numpy"][2:]))
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint does not match this run's model or format: {e}") from None
        self.step, self.epoch, self.batch_in_epoch = s["step"], s["epoch"], s["batch_in_epoch"]
        saved_world = int(s.get("world_size", 1))
        if saved_world != self.world.size:
            seen = self.batch_in_epoch * self.config.batch_size * saved_world
            self.batch_in_epoch = seen // (self.config.batch_size * self.world.size)
            log.warning("resuming a run of %d process(es) on %d: the global batch changes from %d to %d and each "
                        "rank's data order and noise differ from a straight run; the epoch continues after its "
                        "first %d images", saved_world, self.world.size, saved_world * self.config.batch_size,
                        self.world.size * self.config.batch_size, seen)
        self.elapsed = float(s.get("elapsed_s", 0.0))
        self.images_seen = int(s.get("images_seen", self.step * self.config.batch_size))
        self.best_fid = float(s.get("best_fid", float("inf")))
        self.fid_reference = s.get("fid_reference")
        self.meter.load_state_dict(s["meter"])


    def checksum(self) -> float:
        """A float64 sum of every G and D parameter: equal on all ranks when they hold the same weights."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in [*self.g.parameters(), *self.d.parameters()]))


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


class _Meter:
    """Sums of the step figures since the last metrics row (saved, so a resume continues the row)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0
        self.seconds = 0.0

    def add(self, figures: dict[str, float], seconds: float) -> None:
        for k, v in figures.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.seconds += seconds

    def row(self, step: int, epoch: int, batch: int, elapsed: float) -> dict[str, Any]:
        row = {"step": step, "epoch": epoch, **{k: round(v / self.count, 6) for k, v in self.sums.items()},
               "img_per_s": round(self.count * batch / max(self.seconds, 1e-9), 1), "elapsed_s": round(elapsed, 2)}
        self.__init__()
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count, "seconds": self.seconds}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.sums, self.count, self.seconds = dict(s["sums"]), s["count"], s["seconds"]


@contextmanager
def _stop_on_signals():
    """First SIGINT/SIGTERM asks for a stop at the next step boundary; a second one stops at once."""
    asked: dict[str, int | None] = {"signum": None, "again": None}

    def handler(signum, frame):
        if asked["signum"] is not None:
            asked["again"] = signum
            raise KeyboardInterrupt
        asked["signum"] = signum
        log.warning("signal %d: saving at the next step boundary (again to stop at once)", signum)

    with handling(handler, signal.SIGINT, signal.SIGTERM):
        yield asked


class RunFolder:
    """Paths and writers of one run folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self.metrics = self.root / "metrics.csv"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"
        self.saved: tuple[int, Path] | None = None  # (step, path) of the newest checkpoint to resume from

    def discard(self, made: str) -> bool:
        """Undo what this call made (`_prepare_run`'s "folder" or "files") in a run folder that holds no
        checkpoint: only the files training writes (a user's own file keeps the folder), and the folder
        itself only where this call made it. True when all of that is gone."""
        if any(self.checkpoints.glob("*.pt")):
            return False
        for path in [*self.samples.glob("*.png"), self.metrics, self.root / "config.json", self.root / "loss.png"]:
            path.unlink(missing_ok=True)
        for folder in (self.checkpoints, self.samples, self.root)[: 3 if made == "folder" else 2]:
            try:
                folder.rmdir()
            except OSError:
                return False
        return True

    def create(self, config: TrainConfig, *, continuing: bool = False) -> None:
        """A new run folder; `continuing`: for a resume from a checkpoint kept elsewhere."""
        if self.root.exists() and any(self.root.iterdir()):
            if not any(self.checkpoints.glob("*.pt")):
                raise UsageError(f"run folder {self.root} already exists and holds no checkpoint (a run stopped "
                                 "before its first save cannot be resumed); move it away or choose another --run")
            raise UsageError(f"run folder {self.root} already exists and is not empty; "
                             f"use --resume {shlex.quote(str(self.root))} to continue it, or another --run name")
        if continuing:
            log.warning("continuing in the new run folder %s: its metrics.csv starts at the resumed step", self.root)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.samples.mkdir(exist_ok=True)
        ckpt.atomic_write_bytes(self.root / "config.json", json.dumps(config.to_dict(), indent=2).encode())
        with open(self.metrics, "w", newline="") as f:
            csv.writer(f).writerow(METRICS)

    def truncate_metrics(self, step: int) -> None:
        """Keep metrics rows up to `step` (rows after the checkpoint belong to lost work); a file with
        another set of columns (written by an older gantk) is rewritten with today's."""
        rows = self.read_metrics()
        keep = [r for r in rows if int(r["step"]) <= step]
        if len(keep) != len(rows) or self._header() != METRICS:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, METRICS, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(keep)
            ckpt.atomic_write_bytes(self.metrics, buf.getvalue().encode())

    def _header(self) -> list[str] | None:
        if not self.metrics.exists():
            return None
        with open(self.metrics, newline="") as f:
            return next(csv.reader(f), None)

    def read_metrics(self) -> list[dict[str, str]]:
        if not self.metrics.exists():
            return []
        with open(self.metrics, newline="") as f:
            return list(csv.DictReader(f))

    def save_checkpoint(self, state: dict[str, Any], *, step: int, keep: int, numbered: bool) -> None:
        ckpt.save(state, self.last)
        self.saved = (step, self.last)
        if numbered and keep > 0:
            ckpt.save(state, self.checkpoints / f"step-{step:08d}.pt")
            for old in self.numbered()[:-keep]:
                old.unlink()  # only gantk's own numbered checkpoints: a user's step-backup.pt stays

    def numbered(self) -> list[Path]:
        """gantk's step-N.pt checkpoints, oldest first."""
        return ckpt.numbered(self.checkpoints)

    def save_grid(self, images: torch.Tensor, name: str) -> Path:
        from torchvision.utils import make_grid

        from .generate import to_pixels

        pixels = torch.from_numpy(to_pixels(images.float().cpu().numpy())).unsqueeze(1)  # what export writes
        path = self.samples / name
        _save_png(make_grid(pixels, nrow=10, padding=2)[0].numpy(), path)
        return path

    def plot(self) -> None:
        rows = self.read_metrics()
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [int(r["step"]) for r in rows]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(steps, [float(r["loss_d"]) for r in rows], label="loss D", lw=0.8)
        ax.plot(steps, [float(r["loss_g"]) for r in rows], label="loss G", lw=0.8)
        ax.set_xlabel("step")
        fid = [(int(r["step"]), float(r["fid"])) for r in rows if r.get("fid")]
        if fid:
            ax2 = ax.twinx()
            ax2.plot(*zip(*fid), "o-", color="tab:green", lw=1, ms=3, label="FID (classifier space)")
            ax2.set_ylabel("FID")
            ax2.legend(loc="upper right")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        ckpt.atomic_write(self.root / "loss.png", lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)


def _save_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    ckpt.atomic_write(path, lambda f: Image.fromarray(pixels, "L").save(f, format="PNG"))


def new_run_dir(runs_dir: Path, config: TrainConfig) -> Path:
    runs_dir = Path(runs_dir)
    taken = [int(p.name[:5]) for p in runs_dir.glob("[0-9][0-9][0-9][0-9][0-9]-*") if p.name[:5].isdigit()]
    data_name = Path(config.data).name.split(".")[0] if config.data not in data_mod.NAMED else config.data
    return runs_dir / f"{max(taken, default=-1) + 1:05d}-{config.arch}-{data_name}"


# What a resume may change: the length of training and its bookkeeping, never the maths of a step.
# The per-invocation ones (a stop point, the machine) are always this call's, given or not.
PER_INVOCATION = {"max_steps", "device", "workers"}
RESUMABLE = PER_INVOCATION | {"epochs", "checkpoint_every", "keep", "log_every", "sample_every", "eval_every",
                              "eval_count", "classifier"}


def train(config: TrainConfig, *, run_dir: Path | None = None, runs_dir: Path = Path("runs"),
          resume: Path | None = None, progress: Callable[[dict[str, Any]], None] | None = None,
          given: set[str] | None = None) -> dict[str, Any]:
    """Train (or resume) one run; returns a summary. Raises Interrupted after a clean save on a signal.

    Under torchrun every rank calls this: DDP over NCCL (CUDA) or Gloo (CPU), `batch_size` per rank,
    rank 0 alone writes the run folder and reports progress."""
    world = distributed.from_env()
    config = config.replace(data=_absolute(config.data), classifier=_absolute(config.classifier))
    state = None
    if resume is not None:
        try:
            state = ckpt.load(resume)
        except DamagedFileError as e:
            raise DamagedFileError(f"{e}{_other_checkpoint(resume)}") from None
        config = _resumed_config(TrainConfig.from_dict(state["config"]), config, given)
        run_dir = run_dir or (resume.parent.parent if resume.parent.name == "checkpoints" else None)
        if run_dir is None:
            raise UsageError(f"{resume} is not inside a run folder; pass --run to say where to continue")
        _check_target(resume, state["step"], RunFolder(run_dir), config)
    device = resolve_device(config.device)
    if config.amp and device.type == "cpu" and not native_bf16():
        log.warning("bf16 autocast on a CPU without bf16 instructions runs emulated: about 17x slower than "
                    "fp32 on a 2-core AVX2 CPU (BENCHMARKS.md)")
    if config.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only)")
    created = distributed.init(world, device.type)
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        _same_on_every_rank(world, config)
        if config.amp is None:  # rank 0's CPU decides for every rank
            config = config.replace(amp=distributed.gather(world, default_amp(device))[0])
        if device.type == "cuda":
            if world.active:
                device = torch.device("cuda", world.local_rank)
                torch.cuda.set_device(device)
            # Exact resume needs run-to-run identical steps: cuDNN's default choice includes kernels that
            # accumulate with atomics (seen on an H200: a resumed run 2e-4 off a straight one after 9 steps).
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        return _train(config, world, device, (resume, state), run_dir, runs_dir, progress if world.main else None)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        distributed.shutdown(created)


def _same_on_every_rank(world: distributed.World, config: TrainConfig) -> None:
    """Ranks launched with other options (one command per node) would wait for each other in a collective
    until gloo's timeout: refused on every rank at once. Paths and loader workers may differ by node."""
    local = {k: v for k, v in config.to_dict().items() if k not in ("data", "classifier", "workers")}
    configs = distributed.gather(world, local)
    differ = sorted(k for k in local if any(c[k] != local[k] for c in configs))
    if differ:
        raise UsageError(f"the ranks were launched with other {', '.join(differ)} (rank values: "
                         f"{'; '.join(str([c[k] for c in configs]) for k in differ)}); give every node the same options")


def _other_checkpoint(bad: Path) -> str:
    """For a damaged checkpoint of a run folder: the newest intact numbered one beside it, to resume from."""
    if bad.parent.name != "checkpoints":
        return ""
    for other in reversed(RunFolder(bad.parent.parent).numbered()):
        if other.resolve() != bad.resolve() and ckpt.intact(other):
            return f"; the newest intact checkpoint beside it: --resume {other}"
    return ""


def _check_target(resume: Path, step: int, run: RunFolder, config: TrainConfig) -> None:
    """A resume replaces the target folder's last.pt and drops its metrics after `step`: refused where
    that loses training (another run's folder, or an older checkpoint of this one), so the user branches
    with --run instead. An unreadable last.pt is no loss: the resume replaces it, with a warning."""
    if resume.resolve().parent != run.checkpoints.resolve():
        held = [p for p in (run.last, *reversed(run.numbered())) if p.is_file()]
        if held:
            raise UsageError(f"{run.root} holds another run ({held[0]}); continuing {resume} there would replace "
                             f"it: pass a new --run NAME (or, if it is this run, --resume {held[0]})")
        _check_unsaved(run, config)
        return
    if run.last.resolve() == resume.resolve():
        return
    newer, newest = -1, run.last
    if run.last.is_file():
        try:
            newer = ckpt.load(run.last)["step"]
        except CheckpointError as e:
            log.warning("%s; continuing from %s replaces it", e, resume)
    # where last.pt is gone or damaged: the newest intact numbered one
    later = (p for p in reversed(run.numbered()) if ckpt.numbered_step(p) > newer)
    if (p := next((p for p in later if ckpt.intact(p)), None)) is not None:
        newer, newest = ckpt.numbered_step(p), p
    if newer > step:
        raise UsageError(f"{resume} is at step {step}, behind {newest} (step {newer}); continuing in {run.root} "
                         f"would replace it: pass --run NAME to branch into a new run folder")


def _check_unsaved(run: RunFolder, config: TrainConfig) -> None:
    """A folder with no checkpoint but a config.json: this resume's own earlier try (stopped before its
    first save) continues there; another run's, whose metrics a resume would mix with its own, is refused."""
    try:
        doc = json.loads((run.root / "config.json").read_text())
        if not isinstance(doc, dict) or not {"arch", "seed", "data"} <= doc.keys():
            raise ValueError("not a gantk run's")
        theirs = TrainConfig.from_dict(doc)
    except FileNotFoundError:
        return
    except (OSError, ValueError, TypeError, UsageError) as e:
        raise UsageError(f"{run.root} holds a config.json that is not this run's ({e}); move it away or pass a "
                         f"new --run NAME") from None
    differ = _differing({f.name for f in fields(TrainConfig)} - RESUMABLE, theirs, config)
    if differ:
        raise UsageError(f"{run.root} holds another run that stopped before its first save (its config.json has "
                         f"other {', '.join(differ)}); move it away or pass a new --run NAME")


def default_amp(device: torch.device) -> bool:
    """bf16 autocast where the CPU runs bf16 natively: 1.4-1.5x the steps/s of fp32 and as good a FID on
    the real digits (BENCHMARKS.md). Emulated bf16 runs about 17x slower than fp32; CUDA's float16 AMP
    is unmeasured for quality, so both stay off unless asked for."""
    return device.type == "cpu" and native_bf16()


def _resumed_config(stored: TrainConfig, asked: TrainConfig, given: set[str] | None) -> TrainConfig:
    """The checkpoint's config, with the options the caller gave that a resume may change.
    `given=None` (a library call): length and placement of training from `asked`."""
    given = {"epochs"} if given is None else given
    refused = _differing(given - RESUMABLE, asked, stored)
    if refused:
        raise UsageError(f"a resume keeps the run's own {', '.join(refused)} (exact resume); "
                         f"start a new run to change {'them' if len(refused) > 1 else 'it'}")
    config = stored.replace(**{k: getattr(asked, k) for k in (given & RESUMABLE) | PER_INVOCATION})
    if config.eval_every and not config.classifier:  # evaluation starts with this resume: --classifier's default
        config = config.replace(classifier=asked.classifier)
    return config


def _absolute(path: str | None) -> str | None:
    """A path as the checkpoint stores it: absolute, so that the run resumes from any folder."""
    return path if path is None or path in data_mod.NAMED else os.path.abspath(path)


def _differing(names: set[str], a: TrainConfig, b: TrainConfig) -> list[str]:
    """The fields among `names` in which two configs differ, as a resume compares them."""
    return sorted(k for k in names if _comparable(k, a) != _comparable(k, b))


def _comparable(field: str, config: TrainConfig) -> Any:
    """A config value to compare on resume: --data as an absolute path (runs before gantk stored it so
    kept the path as typed)."""
    value = getattr(config, field)
    return _absolute(value) if field == "data" else value


def _train(config: TrainConfig, world: distributed.World, device: torch.device,
           resumed: tuple[Path | None, dict | None], run_dir: Path | None, runs_dir: Path,
           progress: Callable | None) -> dict[str, Any]:
    source, state = resumed
    # a finished run (or one past --max-steps) needs no data: resuming it offline still says so
    finished = state is not None and (state["epoch"] >= config.epochs or
                                      (config.max_steps is not None and state["step"] >= config.max_steps))
    digits = None if finished else data_mod.load(config.data, seed=config.seed, count=config.data_count)
    steps_per_epoch = 0 if finished else len(digits) // (config.batch_size * world.size)
    if not finished and steps_per_epoch == 0:
        raise DataError(f"{digits.source}: {len(digits)} images, fewer than one batch of {config.batch_size} "
                        f"for each of {world.size} process(es)")
    trainer = Trainer(config, device, world)
    if state is not None:
        stored = _stored_dtype(state)
        if stored != trainer.dtype:
            where = "--device cuda" if stored.startswith("fp16") else "--device cpu"
            raise UsageError(f"this run trains in {stored}; on {device.type} it would train in {trainer.dtype}, "
                             f"another step (exact resume): resume it with {where}")
        trainer.load_state_dict(state)
    # the last step of the last epoch (counted from where a resume stands, as the world size may differ)
    final = trainer.step + (config.epochs - trainer.epoch) * steps_per_epoch - trainer.batch_in_epoch
    total = final if config.max_steps is None else min(final, config.max_steps)
    start = trainer.step
    info = dict(device=str(device), dtype=trainer.dtype, world_size=world.size, rank=world.rank,
                batch_per_rank=config.batch_size, global_batch=config.batch_size * world.size,
                images=len(digits) if digits else None, data=digits.source if digits else config.data,
                steps_per_epoch=steps_per_epoch or None, total_steps=total,
                start_step=start, epochs=config.epochs, seed=config.seed, lr_g=config.lr_g, lr_d=config.lr_d)
    if finished:  # no folder is touched
        return {**info, "run_dir": str(source.parent.parent if source.parent.name == "checkpoints" else source.parent),
                "steps": start, "steps_run": 0, "epochs_done": trainer.epoch, "checkpoint": str(source),
                "elapsed_s": round(trainer.elapsed, 2), "last_step": {}}
    evaluator = _Evaluator(config, digits) if config.eval_every and world.main else None
    # from the run folder's making on, a first signal stops at a step boundary, after a save: a folder
    # left without a checkpoint could not be continued by the same command
    with _stop_on_signals() as stop:
        root, made = distributed.on_main(world, lambda: _prepare_run(config, run_dir, runs_dir, start))
        run = RunFolder(root)
        run.saved = (start, source) if state is not None else None
        info["run_dir"] = str(run.root)
        if state is not None:
            log.info("resumed %s at step %d (%d epoch%s done)", run.root, trainer.step, trainer.epoch,
                     "" if trainer.epoch == 1 else "s")
        try:
            images = data_mod.to_tensor(digits.images)
            if progress:
                progress({"event": "start", **info})
            _loop(trainer, run, images, total, final, steps_per_epoch, stop, progress, evaluator)
        except KeyboardInterrupt:  # a second signal: no save
            raise Interrupted(_unsaved(trainer, run, made if world.main else ""),
                              stop["again"] or signal.SIGINT) from None
        except DivergedError as e:
            if world.main:
                e.args = (f"{e}; " + (f"the last checkpoint is step {run.saved[0]}'s: {run.saved[1]}" if run.saved
                                      else f"nothing was saved ({run.metrics} has the losses before it)"),)
            raise
    distributed.barrier(world)
    if progress:
        progress({"event": "end", "step": trainer.step})
    return {**info, "steps": trainer.step, "steps_run": trainer.step - start, "epochs_done": trainer.epoch,
            "checkpoint": str(run.last), "elapsed_s": round(trainer.elapsed, 2), "last_step": trainer.last_figures}


def _unsaved(t: Trainer, run: RunFolder, made: str) -> str:
    """What a stop without a save leaves: the checkpoint to resume from (the one this call started from,
    into this folder, if it saved none), or nothing; `made`: what this call made (`_prepare_run`)."""
    stopped = f"stopped at once at step {t.step} (a second signal)"
    if run.saved is None and run.best.exists():
        return (f"{stopped}, before the first last.pt: only {run.best} (the best FID so far) was saved; resume "
                f"from it with: {resume_command(run.best, t.config, world_size=t.world.size)}")
    if run.saved is None:
        gone = ""
        if made and run.discard(made):
            gone = f"; removed the new run folder {run.root}" if made == "folder" else f"; emptied {run.root} again"
        return f"{stopped}, before the first checkpoint: nothing saved{gone}"
    step, path = run.saved
    into = run.root if path.resolve().parent != run.checkpoints.resolve() else None
    return (f"{stopped}, unsaved since step {step}; resume with: "
            f"{resume_command(path, t.config, into=into, world_size=t.world.size)}")


def resume_command(path: Path, config: TrainConfig, *, into: Path | None = None, world_size: int = 1) -> str:
    """The command that continues a run from `path` (into the run folder `into`) as far as this call was
    asked to go, on the same device, under torchrun with as many processes (exact resume needs them)."""
    words, launch = ["gantk", "train", "--resume", str(path)], ""
    if world_size > 1:  # one node: the whole launch; several: their rendezvous options are the user's
        single = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) == world_size
        launch = f"torchrun {f'--nproc-per-node {world_size}' if single else '<the same launch options>'} -m gantk -- "
        words = words[1:]
    if into is not None:
        words += ["--runs-dir", str(into.parent), "--run", into.name]
    if config.max_steps is not None:
        words += ["--max-steps", str(config.max_steps)]
    if config.device != "auto":
        words += ["--device", config.device]
    return launch + shlex.join(words)


def _stored_dtype(state: dict[str, Any]) -> str:
    """What a checkpoint's run computed in (older checkpoints: fp16 autocast is the one with a scaler)."""
    if "compute_dtype" in state:
        return state["compute_dtype"]
    if not state["config"].get("amp"):
        return "fp32"
    return "fp16 autocast" if state.get("scaler") else "bf16 autocast"


def _prepare_run(config: TrainConfig, run_dir: Path | None, runs_dir: Path, step: int) -> tuple[Path, str]:
    """Rank 0: create a new run folder, or trim a resumed one's metrics to its checkpoint; (folder, what
    this call made: "folder", "files" in an empty folder the user made, "" for a resumed one)."""
    run = RunFolder(run_dir or new_run_dir(runs_dir, config))
    if step and (run.root / "config.json").exists():
        run.checkpoints.mkdir(exist_ok=True)
        run.samples.mkdir(exist_ok=True)
        run.truncate_metrics(step)
        for tmp in run.checkpoints.glob(".*.pt.*.tmp"):  # a save that a kill (SIGKILL, power) cut short
            tmp.unlink(missing_ok=True)
        return run.root, ""
    made = "files" if run.root.is_dir() else "folder"
    run.create(config, continuing=bool(step))
    return run.root, made


def _loop(t: Trainer, run: RunFolder, images: torch.Tensor, total: int, final: int, steps_per_epoch: int,
          stop: dict, progress: Callable | None, evaluator: "_Evaluator | None") -> None:
    cfg, main = t.config, t.world.main
    pin = t.device.type == "cuda"
    fixed = fixed_noise(t.g.latent_shape, cfg.seed).to(t.device)
    with (open(run.metrics, "a", newline="") if main else nullcontext()) as mf:
        writer = csv.DictWriter(mf, METRICS, restval="") if main else None
        tick = time.perf_counter()  # every second of the loop, bookkeeping included, lands in elapsed
        while t.step < total:
            order = epoch_order(cfg.seed, t.epoch, len(images), t.world)
            batches = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                       for i in range(t.batch_in_epoch, steps_per_epoch)][: total - t.step]
            # its own generator: a loader would draw its workers' base seed from torch's global RNG, which
            # a resume (one loader more, mid-epoch) would leave in another state than a straight run
            loader = torch.utils.data.DataLoader(_Batches(images), sampler=batches, batch_size=None,
                                                 num_workers=cfg.workers, pin_memory=pin,
                                                 # a stop sent to the whole job (a terminal, a scheduler)
                                                 # is the main process's: it ends the workers itself
                                                 worker_init_fn=ignore_stops,
                                                 generator=torch.Generator().manual_seed(cfg.seed))
            for x in loader:
                figures = t.train_step(x.to(t.device, non_blocking=True), stop=stop["signum"] is not None)
                stopping = figures.pop("stop")
                now = time.perf_counter()
                t.meter.add(figures, now - tick)
                t.elapsed += now - tick
                tick = now
                t.batch_in_epoch += 1
                if t.batch_in_epoch == steps_per_epoch:
                    t.epoch, t.batch_in_epoch = t.epoch + 1, 0
                quality, best = evaluator(t) if evaluator and t.step % cfg.eval_every == 0 else ({}, False)
                row = t.meter.row if quality or t.step % cfg.log_every == 0 or t.step == final else None
                if row and main:
                    writer.writerow({**row(t.step, t.epoch, cfg.batch_size * t.world.size, t.elapsed), **quality})
                    mf.flush()
                elif row:
                    row(t.step, t.epoch, cfg.batch_size, t.elapsed)  # every rank restarts its sums alike
                if best:
                    _finite(t.step, [t.checksum()])
                    ckpt.save(t.state_dict(), run.best)
                if progress:
                    progress({"event": "step", "step": t.step, **figures})
                epoch_end = t.batch_in_epoch == 0
                if main and (epoch_end or t.step == total or stopping):  # a stop shows where it stopped too
                    _end_of_epoch(t, run, fixed, final=t.step == total or stopping)
                if t.step % cfg.checkpoint_every == 0 or epoch_end or t.step == total or stopping:
                    _checkpoint(t, run, numbered=t.step % cfg.checkpoint_every == 0 or t.step == total)
                if stopping:
                    distributed.barrier(t.world)  # nobody exits (and so signals the others) before the save
                    again = resume_command(run.last, cfg, world_size=t.world.size)
                    raise Interrupted(f"stopped at step {t.step}; resume with: {again}", stop["signum"] or signal.SIGTERM)


def _checkpoint(t: Trainer, run: RunFolder, *, numbered: bool) -> None:
    """Every rank reports a weight checksum; rank 0 checks they agree and saves."""
    sums = distributed.gather(t.world, t.checksum())
    _finite(t.step, sums)
    if not t.world.main:
        return
    if len(set(sums)) > 1:
        raise GantkError(f"ranks disagree on the weights at step {t.step} (checksums {sums}); not saving")
    run.save_checkpoint(t.state_dict(rank_checksums=sums), step=t.step, keep=t.config.keep, numbered=numbered)


def _finite(step: int, checksums: list[float]) -> None:
    """DivergedError where a step of finite losses left a weight NaN or inf (its checksum is not finite)."""
    if not all(math.isfinite(v) for v in checksums):
        raise DivergedError(f"training diverged at step {step}: its losses were finite but the weights are not "
                            f"(NaN or inf); this step is not saved")


class _Evaluator:
    """Scores the sampling generator against the training data in a digit classifier's feature space;
    keeps checkpoints/best.pt at the lowest FID."""

    def __init__(self, config: TrainConfig, digits: data_mod.Digits):
        from . import classifier, evaluate

        if config.eval_count < evaluate.MIN_SAMPLES:
            raise UsageError(f"--eval-count {config.eval_count} is too few: FID in the classifier's "
                             f"{evaluate.MIN_SAMPLES - 1}-d feature space needs at least {evaluate.MIN_SAMPLES}")
        if not config.classifier:
            raise UsageError("--eval-every needs --classifier (make one with `gantk classifier train`)")
        self.classifier = classifier.load(config.classifier)
        self.reference = evaluate.load_reference(digits, classifier=self.classifier)
        self.count, self.seed = config.eval_count, config.seed

    def __call__(self, t: Trainer) -> tuple[dict[str, float], bool]:
        """The step's quality figures, and whether its FID is the best so far (the caller saves best.pt
        once the step's metrics row is written, so that best.pt resumes like any checkpoint)."""
        from .evaluate import score
        from .generate import to_pixels

        z = fixed_noise(t.g.latent_shape, self.seed + 2, self.count).to(t.device)
        with torch.no_grad():
            x = torch.cat([t.sampler.eval()(chunk) for chunk in z.split(500)]).float().cpu()
        if t.ema is None:
            t.g.train()
        pixels = to_pixels(x.numpy())
        m = score(pixels, classifier=self.classifier, reference=self.reference, seed=self.seed)
        yardstick = f"{self.reference.key}:{self.count}"  # FID depends on the sample count too
        if t.fid_reference not in (None, yardstick):  # None: a checkpoint from before gantk kept it
            if t.best_fid < float("inf"):
                log.warning("best.pt's FID %.2f was measured with another classifier, data, held-out split or "
                            "--eval-count; this evaluation's FID replaces it as the best", t.best_fid)
            t.best_fid = float("inf")
        t.fid_reference = yardstick
        best = m["fid"] < t.best_fid
        t.best_fid = min(t.best_fid, m["fid"])
        log.info("step %d: FID %.2f (best %.2f), precision %.3f, recall %.3f", t.step, m["fid"],
                 t.best_fid, m["precision"], m["recall"])
        return {k: round(float(m[k]), 6) for k in EVAL_METRICS}, best


def _end_of_epoch(t: Trainer, run: RunFolder, fixed: torch.Tensor, *, final: bool) -> None:
    epoch_done = t.epoch if t.batch_in_epoch == 0 else t.epoch + 1
    if not final and epoch_done % t.config.sample_every:
        return
    g = t.sampler
    was_training = g.training
    g.eval()
    with torch.no_grad():
        images = g(fixed)
    g.train(was_training)
    name = f"epoch-{epoch_done:04d}.png" if t.batch_in_epoch == 0 else f"step-{t.step:08d}.png"
    path = run.save_grid(images, name)
    ckpt.atomic_write_bytes(run.samples / "latest.png", path.read_bytes())
    run.plot()

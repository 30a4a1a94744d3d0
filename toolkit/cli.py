"""The `gantk` command line: parse, call one library function, print. Errors map to exit codes here."""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__

log = logging.getLogger("gantk")


def _echo(msg: str = "") -> None:
    click.echo(msg, err=True)


def _emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="gantk: %(message)s", stream=sys.stderr, force=True)


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the documented exit code (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import GantkError

        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except GantkError as e:
            if debug:
                raise
            click.echo(f"gantk: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("gantk: interrupted", err=True)
            sys.exit(130)
        except OSError as e:
            if debug:
                raise
            click.echo(f"gantk: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)

    return wrapper


def _progress_bar(total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gantk")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Train a small MNIST GAN, export it, and generate digits fast and verified."""


# ------------------------------------------------------------------------------------------ train


@cli.command()
@click.option("--data", default="mnist", show_default=True,
              help="mnist, synthetic, or a path: IDX file (.gz or raw), image folder, .npy/.npz.")
@click.option("--data-count", type=int, default=None, help="Use at most this many images (synthetic: render this many).")
@click.option("--recipe", type=click.Choice(["default", "tutorial"]), default="default", show_default=True,
              help="default: the stabilised recipe; tutorial: the seed model exactly as the tutorial trained it.")
@click.option("--arch", type=click.Choice(["seed", "dcgan"]), default=None, help="Architecture [default: seed].")
@click.option("--epochs", type=int, default=None, help="Epochs [default: 60].")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps in all.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=None, help="Learning rate of G and D [default: 2e-4].")
@click.option("--lr-d", type=float, default=None, help="Learning rate of D, when it differs from --lr.")
@click.option("--betas", type=(float, float), default=(0.5, 0.999), show_default=True)
@click.option("--loss", type=click.Choice(["logits", "bce"]), default=None,
              help="logits: BCEWithLogitsLoss [default]; bce: Sigmoid + BCELoss as in the tutorial.")
@click.option("--spectral-norm/--no-spectral-norm", default=None, help="Spectral norm in D [default: on].")
@click.option("--label-smoothing", type=float, default=None, help="Target for real images [default: 0.9].")
@click.option("--ema", "ema_decay", type=float, default=None, help="EMA decay of the sampling generator, 0 for none [default: 0.999].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--amp", is_flag=True, help="Mixed precision (float16 autocast, CUDA only).")
@click.option("--workers", type=int, default=0, show_default=True, help="Data-loader worker processes.")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--run", "run_name", default=None, help="Run folder name under --runs-dir [default: NNNNN-arch-data].")
@click.option("--resume", default=None, help="Checkpoint or run folder to continue, or 'auto' for the newest run.")
@click.option("--checkpoint-every", type=int, default=1000, show_default=True, help="Steps between numbered checkpoints.")
@click.option("--keep", type=int, default=3, show_default=True, help="Numbered checkpoints kept besides last.pt.")
@click.option("--sample-every", type=int, default=1, show_default=True, help="Epochs between sample grids.")
@click.option("--log-every", type=int, default=10, show_default=True, help="Steps per metrics.csv row.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("-v", "--verbose", count=True, help="More detail.")
@handle_errors
def train(**o: Any) -> None:
    """Train the digit GAN and write a run folder: checkpoints, samples, metrics.csv, loss.png."""
    from .checkpoint import newest_checkpoint, resolve
    from .config import TUTORIAL, TrainConfig
    from .train import train as run_training

    _setup_logging(o["verbose"], o["quiet"])
    recipe = dict(TUTORIAL) if o["recipe"] == "tutorial" else {}
    picks = dict(arch=o["arch"], epochs=o["epochs"], loss=o["loss"], spectral_norm=o["spectral_norm"],
                 label_smoothing=o["label_smoothing"], ema_decay=o["ema_decay"], lr_g=o["lr"],
                 lr_d=o["lr_d"] or o["lr"])
    recipe.update({k: v for k, v in picks.items() if v is not None})
    config = TrainConfig(data=o["data"], data_count=o["data_count"], max_steps=o["max_steps"],
                         batch_size=o["batch_size"], beta1=o["betas"][0], beta2=o["betas"][1], seed=o["seed"],
                         device=o["device"], amp=o["amp"], workers=o["workers"],
                         checkpoint_every=o["checkpoint_every"], keep=o["keep"], log_every=o["log_every"],
                         sample_every=o["sample_every"], **recipe)
    resume = None
    if o["resume"] == "auto":
        resume = newest_checkpoint(o["runs_dir"])
        _echo(f"resume: {resume} (newest run)")
    elif o["resume"]:
        resume = resolve(o["resume"])
    if resume is not None and o["epochs"] is None:
        config = config.replace(epochs=_stored_epochs(resume))
    run_dir = o["runs_dir"] / o["run_name"] if o["run_name"] else None
    bar = None

    def progress(ev: dict[str, Any]) -> None:
        nonlocal bar
        if ev["event"] == "start":
            if not o["quiet"]:
                _echo(f"train: {ev['run_dir']} on {ev['device']} ({o['device']}), {ev['images']} images from "
                      f"{ev['data']}, {ev['total_steps']} steps of {config.batch_size}")
            bar = _progress_bar(ev["total_steps"], ev["start_step"], "train")
        elif ev["event"] == "step":
            bar.update(1)
            if ev["step"] % 10 == 0:
                bar.set_postfix(loss_d=f"{ev['loss_d']:.3f}", loss_g=f"{ev['loss_g']:.3f}", refresh=False)
        elif bar is not None:
            bar.close()

    try:
        summary = run_training(config, run_dir=run_dir, runs_dir=o["runs_dir"], resume=resume, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if o["as_json"]:
        _emit_json(summary)
    elif not o["quiet"]:
        last = summary["last_step"]
        _echo(f"done: {summary['steps']} steps, {summary['epochs_done']} epochs in {summary['elapsed_s']:.1f}s; "
              f"loss_d {last.get('loss_d', float('nan')):.3f} loss_g {last.get('loss_g', float('nan')):.3f}; "
              f"checkpoint {summary['checkpoint']}")


def _stored_epochs(path: Path) -> int:
    from .checkpoint import load

    return int(load(path)["config"]["epochs"])


# ------------------------------------------------------------------------------------------ doctor


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@handle_errors
def doctor(as_json: bool) -> None:
    """Versions, CUDA/cuDNN as torch sees them, onnxruntime providers, and known conflicts."""
    from .doctor import report

    r = report()
    if as_json:
        _emit_json(r)
        return
    for k, v in r.items():
        if k != "warnings":
            _echo(f"{k:>24}: {v}")
    for w in r["warnings"]:
        _echo(f"warning: {w}")


def main() -> None:
    cli(prog_name="gantk")


if __name__ == "__main__":
    main()

"""The `gantk` command line: parse, call one library function, print. Errors map to exit codes here."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__

log = logging.getLogger("gantk")


def _echo(msg: str = "") -> None:
    click.echo(msg, err=True)


def _emit_json(doc: Any) -> None:
    """One JSON document on stdout: strict JSON, so NaN and infinity (no FID yet) are null."""
    click.echo(json.dumps(_strict(doc), indent=2, default=str, allow_nan=False))


def _strict(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    return [_strict(v) for v in x] if isinstance(x, (list, tuple)) else x


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 talks
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gantk: %(message)s"))
    log.handlers[:] = [handler]  # gantk's own records only: the exporters' libraries log a lot at INFO
    log.setLevel(level)
    log.propagate = False


_PROCESS = {"own": False}  # True when gantk is the process (main), not a caller's CliRunner


def _deaf() -> None:
    """Stopped and saved: what is left is a line and the exit, which a further signal would only break
    (tracebacks from Python's exit handlers)."""
    from .errors import ignore_stops

    if _PROCESS["own"]:
        ignore_stops()


def _interrupted(e: KeyboardInterrupt) -> None:
    _deaf()
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal; one says so
        click.echo("gantk: interrupted", err=True)
    sys.exit(128 + getattr(e, "signum", signal.SIGINT))


def _peer_lost(e: Exception) -> bool:
    """Under torchrun: a collective failed because another rank exited (its error is its own)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the documented exit code (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import GantkError, sigterm_as_interrupt

        debug = click.get_current_context().meta.get("gantk.debug", False)
        try:
            with sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except GantkError as e:
            if debug:
                traceback.print_exc()  # and the same exit code as without --debug
            from .errors import Interrupted, interrupt_behind

            if isinstance(e, Interrupted):
                _deaf()
            elif (stop := interrupt_behind(e)) is not None:  # a library's error while it was stopped: the stop
                _interrupted(stop)
            if not isinstance(e, Interrupted):
                click.echo(f"gantk: error: {e}", err=True)
            elif os.environ.get("RANK", "0") == "0":
                click.echo(f"gantk: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
            _interrupted(e)
        except OSError as e:
            if debug:
                traceback.print_exc()
            click.echo(f"gantk: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except Exception as e:  # a bug: one line, the traceback with --debug
            from .errors import interrupt_behind

            stop = interrupt_behind(e)
            if stop is not None:  # as for a GantkError above
                _interrupted(stop)
            if debug:
                traceback.print_exc()
            if _peer_lost(e):
                click.echo(f"gantk: error: rank {os.environ.get('RANK')} lost another rank of the job (that rank's "
                           f"own error, or torchrun's report, says why)", err=True)
                sys.exit(1)
            click.echo(f"gantk: error: internal error ({type(e).__name__}: {e})"
                       f"{'' if debug else '; rerun with --debug for the traceback'}", err=True)
            sys.exit(1)

    return wrapper


def _progress_bar(total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


class _Out(click.Path):
    """A path to write to: never empty (it would be the current folder); for a file, not one ending in a
    slash (pathlib drops it, and a file of the folder's name would be written)."""

    def __init__(self, *, file: bool):
        super().__init__(path_type=Path)  # an existing folder for a file: the command says what to give
        self.file = file

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a path", param, ctx)
        if self.file and isinstance(value, str) and (value.endswith(("/", os.sep)) or
                                                     os.path.basename(value) in (".", "..")):
            self.fail(f"{value!r} names a folder; give a file path inside it", param, ctx)
        return super().convert(value, param, ctx)


class _OneLineUsage(click.UsageError):
    """Click's usage errors in gantk's form: one line on stderr, exit 2."""

    def show(self, file: Any = None) -> None:
        hint = f"; see '{self.ctx.command_path} --help'" if self.ctx is not None else ""
        click.echo(f"gantk: error: {self.format_message().rstrip('.')}{hint}", err=True)


def _one_line(e: click.UsageError, ctx: click.Context) -> click.UsageError:
    done = isinstance(e, (_OneLineUsage, click.exceptions.NoArgsIsHelpError))  # help is shown whole
    return e if done else _OneLineUsage(e.format_message(), e.ctx or ctx)


def _debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta["gantk.debug"] = True  # meta is shared by the whole command line's contexts


class _Command(click.Command):
    """Every command takes --debug, before or after its name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True, callback=_debug,
                                        help="Show tracebacks instead of one-line errors."))

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise _one_line(e, ctx) from None


class _Group(_Command, click.Group):
    command_class = _Command
    group_class = type  # subgroups are _Group too

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            raise _one_line(e, ctx) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # "Missing command", raised here rather than in parsing
            raise _one_line(e, ctx) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gantk")
def cli() -> None:
    """Train a small MNIST GAN, export it, and generate digits fast and verified."""


# ------------------------------------------------------------------------------------------ train


@cli.command()
@click.option("--data", default="mnist", show_default=True,
              help="mnist, synthetic, or a path: IDX file (.gz or raw), image folder, .npy/.npz.")
@click.option("--data-count", type=int, default=None, help="Use the first N images, in file order (a folder: sorted paths; synthetic: render N).")
@click.option("--recipe", type=click.Choice(["default", "tutorial"]), default="default", show_default=True,
              help="default: the stabilised recipe; tutorial: the seed model exactly as the tutorial trained it.")
@click.option("--arch", type=click.Choice(["seed", "dcgan"]), default=None, help="Architecture [default: dcgan].")
@click.option("--epochs", type=int, default=None, help="Epochs [default: 30].")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps in all.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per step (per rank under torchrun).")
@click.option("--lr", type=float, default=None, help="Learning rate of G and D [default: 2e-4].")
@click.option("--lr-d", type=float, default=None, help="Learning rate of D, when it differs from --lr.")
@click.option("--betas", type=(float, float), default=(0.5, 0.999), show_default=True)
@click.option("--loss", type=click.Choice(["logits", "bce"]), default=None,
              help="logits: BCEWithLogitsLoss [default]; bce: Sigmoid + BCELoss as in the tutorial.")
@click.option("--spectral-norm/--no-spectral-norm", default=None, help="Spectral norm in D instead of BatchNorm [default: off].")
@click.option("--label-smoothing", type=float, default=None, help="Target for real images [default: 0.9].")
@click.option("--ema", "ema_decay", type=float, default=None, help="EMA decay of the sampling generator, 0 for none [default: 0.999].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds data order, noise and initial weights.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--amp/--no-amp", default=None, help="Mixed precision: bfloat16 autocast on the CPU (1.4-1.5x, "
              "FID as good: BENCHMARKS.md), float16 autocast with a gradient scaler on CUDA [default: on where "
              "the CPU has bf16 instructions (AVX512-BF16, AMX), off on CUDA and other CPUs; a resume keeps "
              "the run's].")
@click.option("--sync-bn", is_flag=True, help="Under torchrun: SyncBatchNorm across ranks (CUDA only) "
              "[default: off, each rank normalises its own batch].")
@click.option("--workers", type=int, default=0, show_default=True, help="Data-loader worker processes.")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--run", "run_name", default=None, help="Run folder name under --runs-dir [default: NNNNN-arch-data].")
@click.option("--resume", default=None, help="Checkpoint or run folder to continue, or 'auto' for the newest run.")
@click.option("--checkpoint-every", type=int, default=1000, show_default=True, help="Steps between numbered checkpoints.")
@click.option("--keep", type=int, default=3, show_default=True, help="Numbered checkpoints kept besides last.pt.")
@click.option("--sample-every", type=int, default=1, show_default=True, help="Epochs between sample grids.")
@click.option("--log-every", type=int, default=10, show_default=True, help="Steps per metrics.csv row.")
@click.option("--eval-every", type=int, default=0, show_default=True,
              help="Steps between quality evaluations (FID etc. into metrics.csv, best.pt by FID); 0: none.")
@click.option("--eval-count", type=int, default=1000, show_default=True, help="Samples per evaluation.")
@click.option("--classifier", "classifier_path", default=None,
              help="Classifier for --eval-every [default: <runs-dir>/classifier.pt].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("-v", "--verbose", count=True, help="More detail.")
@handle_errors
def train(**o: Any) -> None:
    """Train the digit GAN and write a run folder: checkpoints, samples, metrics.csv, loss.png."""
    from .checkpoint import newest_to_resume, resolve
    from .config import TUTORIAL, TrainConfig
    from .errors import UsageError
    from .train import train as run_training

    if o["quiet"] and o["verbose"]:
        raise UsageError("-q and -v contradict each other; give one")
    _setup_logging(o["verbose"], o["quiet"])
    recipe = dict(TUTORIAL) if o["recipe"] == "tutorial" else {}
    picks = dict(arch=o["arch"], epochs=o["epochs"], loss=o["loss"], spectral_norm=o["spectral_norm"],
                 label_smoothing=o["label_smoothing"], ema_decay=o["ema_decay"], lr_g=o["lr"],
                 lr_d=o["lr"] if o["lr_d"] is None else o["lr_d"], amp=o["amp"])
    recipe.update({k: v for k, v in picks.items() if v is not None})
    config = TrainConfig(data=o["data"], data_count=o["data_count"], max_steps=o["max_steps"],
                         batch_size=o["batch_size"], beta1=o["betas"][0], beta2=o["betas"][1], seed=o["seed"],
                         device=o["device"], sync_bn=o["sync_bn"], workers=o["workers"],
                         checkpoint_every=o["checkpoint_every"], keep=o["keep"], log_every=o["log_every"],
                         sample_every=o["sample_every"], eval_every=o["eval_every"], eval_count=o["eval_count"],
                         classifier=o["classifier_path"] or (str(o["runs_dir"] / "classifier.pt")
                                                             if o["eval_every"] else None), **recipe)
    resume = None
    if o["resume"] == "auto":
        resume = newest_to_resume(o["runs_dir"])
        _echo(f"resume: {resume} (newest run)")
    elif o["resume"]:
        resume = resolve(o["resume"])
    if o["run_name"] is not None and (o["run_name"] in ("", ".", "..") or os.sep in o["run_name"]):
        raise UsageError(f"--run is a folder name under --runs-dir, got {o['run_name']!r}")
    run_dir = o["runs_dir"] / o["run_name"] if o["run_name"] else None
    auto_amp = config.amp is None and resume is None
    bar = None

    def progress(ev: dict[str, Any]) -> None:
        nonlocal bar
        if ev["event"] == "start":
            if not o["quiet"]:
                ranks = f" x {ev['world_size']} ranks = {ev['global_batch']} per step" if ev["world_size"] > 1 else ""
                first, last = ev["start_step"] + 1, ev["total_steps"]
                span = (f"step {last}" if first == last else f"steps {first}-{last}" if first > 1
                        else _plural(last, "step"))
                lr = f"lr {ev['lr_g']:g}" + (f"/{ev['lr_d']:g}" if ev["lr_d"] != ev["lr_g"] else "")
                _echo(f"train: {ev['run_dir']} on {ev['device']} ({o['device']}), {ev['dtype']}"
                      f"{' (auto)' if auto_amp else ''}, {ev['images']} images from {ev['data']}, "
                      f"{span}, batch {config.batch_size}{ranks} (--epochs {ev['epochs']}"
                      f"{f', --max-steps {config.max_steps}' if config.max_steps else ''}), {lr}, seed {ev['seed']}")
            bar = _progress_bar(ev["total_steps"], ev["start_step"], "train")
        elif ev["event"] == "step":
            bar.update(1)
            if ev["step"] % 10 == 0:
                bar.set_postfix(loss_d=f"{ev['loss_d']:.3f}", loss_g=f"{ev['loss_g']:.3f}", refresh=False)
        elif bar is not None:
            bar.close()

    try:
        summary = run_training(config, run_dir=run_dir, runs_dir=o["runs_dir"], resume=resume, progress=progress,
                               given=_given_fields())
    finally:
        if bar is not None:
            bar.close()
    if summary["rank"] != 0:
        return
    if o["as_json"]:
        _emit_json(summary)
    elif summary["steps_run"] == 0:
        limit = f", --max-steps {config.max_steps}" if config.max_steps is not None else ""
        _echo(f"nothing to train: {summary['checkpoint']} is at step {summary['steps']} with "
              f"{_plural(summary['epochs_done'], 'epoch')} done (--epochs {summary['epochs']}{limit}); pass --epochs "
              f"or --max-steps above that to train further")
    elif not o["quiet"]:
        last = summary["last_step"]
        _echo(f"done: step {summary['steps']} ({summary['steps_run']} this run), "
              f"{_plural(summary['epochs_done'], 'epoch')}, {summary['elapsed_s']:.1f}s of training in all; "
              f"loss_d {last['loss_d']:.3f} loss_g {last['loss_g']:.3f}; checkpoint {summary['checkpoint']}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# CLI options that set several TrainConfig fields, or a field of another name.
_FIELDS = {"lr": ("lr_g", "lr_d"), "betas": ("beta1", "beta2"), "classifier_path": ("classifier",),
           "recipe": ("arch", "loss", "spectral_norm", "ema_decay", "label_smoothing", "lr_g", "lr_d", "amp")}


def _given_fields() -> set[str]:
    """The TrainConfig fields the user set on the command line (a resume keeps the others)."""
    from dataclasses import fields

    from .config import TrainConfig

    ctx = click.get_current_context()
    given = {f for name in ctx.params if ctx.get_parameter_source(name).name != "DEFAULT"
             for f in _FIELDS.get(name, (name,))}
    return given & {f.name for f in fields(TrainConfig)}


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


# ------------------------------------------------------------------------------------------ generate


@cli.command()
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX/TorchScript export, or a checkpoint for --backend torch [default: newest run's export].")
@click.option("--backend", type=click.Choice(["onnxruntime", "torchscript", "torch"]), default="onnxruntime",
              show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cuda", "tensorrt", "cpu"]), default="auto", show_default=True,
              help="Where it runs; auto takes the GPU when usable, else the CPU (with a warning where a GPU is "
                   "there but unusable); an explicit one must be active.")
@click.option("--out", type=_Out(file=False), default=Path("digits"), show_default=True)
@click.option("--count", type=int, default=10000, show_default=True)
@click.option("--start", type=int, default=0, show_default=True, help="First index.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed: image i depends on (model, seed, i).")
@click.option("--shard", default="0/1", show_default=True, help="k/n: only indices i with i mod n == k.")
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Images per inference call; changes no byte of the output.")
@click.option("--format", "fmt", type=click.Choice(["png", "npy"]), default="png", show_default=True)
@click.option("--grid", is_flag=True, help="Also write grid.png, a contact sheet of the first 64.")
@click.option("--overwrite", is_flag=True, help="Replace another model's/seed's gantk output in --out.")
@click.option("--parity-samples", type=int, default=64, show_default=True)
@click.option("--atol", type=float, default=None, help="Parity tolerance [default: 1e-4 fp32, 1e-2 fp16, 4e-2 bf16].")
@click.option("--no-parity", is_flag=True, help="Generate without the parity check against PyTorch.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Checkpoint to check parity against [default: the source named in the model's metadata].")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads on the CPU, per stream; alone: one stream of that many [default: 1 per stream "
                   "for onnxruntime, measured choice for torch].")
@click.option("--streams", type=int, default=None,
              help="onnxruntime on the CPU: concurrent runs, each on a slice of the batch [default: one per core "
                   "inference gets; see README].")
@click.option("--writers", type=int, default=None,
              help="Worker processes for noise and PNGs [default: the cores inference leaves, at least 2].")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@handle_errors
def generate(**o: Any) -> None:
    """Generate digits with ONNX Runtime (or TorchScript/torch), parity-checked, resumable, deterministic."""
    from .generate import Request, generate as run_generate, parse_shard

    _setup_logging(0, o["quiet"])
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    say = _echo if main_rank and not o["quiet"] else (lambda m: None)
    model = o["model"] or _default_model(o["backend"], o["runs_dir"])
    if o["model"] is None:
        say(f"model: {model} (newest run's {'checkpoint' if o['backend'] == 'torch' else 'export'})")
    if click.get_current_context().get_parameter_source("out").name == "DEFAULT":
        say(f"out: {o['out']}/ (default)")
    req = Request(out=o["out"], seed=o["seed"], start=o["start"], count=o["count"], shard=parse_shard(o["shard"]),
                  batch_size=o["batch_size"], fmt=o["fmt"], grid=o["grid"], overwrite=o["overwrite"],
                  parity=not o["no_parity"], parity_samples=o["parity_samples"], atol=o["atol"],
                  reference=o["reference"], writers=o["writers"])
    bar = None

    def progress(ev: dict[str, Any]) -> None:
        nonlocal bar
        if ev["event"] == "start" and main_rank:
            bar = _progress_bar(ev["total"], ev["done"], "generate")
            bar.unit = "img"
        elif ev["event"] == "written" and bar is not None:
            bar.update(ev["n"])
        elif bar is not None:
            bar.close()

    try:
        s = run_generate(req, model=model, backend=o["backend"], provider=o["provider"], threads=o["threads"],
                         streams=o["streams"], progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if main_rank:
        _emit_json(s) if o["as_json"] else say(_generate_line(s))


def _default_model(backend: str, runs_dir: Path) -> Path:
    from .checkpoint import newest_run
    from .errors import UsageError

    run = newest_run(runs_dir)
    name = {"onnxruntime": "export/generator.onnx", "torchscript": "export/generator.pt",
            "torch": "checkpoints/last.pt"}[backend]
    if not (run / name).is_file():
        fmt = "onnx" if backend == "onnxruntime" else "torchscript"
        raise UsageError(f"no {name} in the newest run {run} (run `gantk export --format {fmt}` first, or pass --model)")
    return run / name


def _generate_line(s: dict[str, Any]) -> str:
    p = s["parity"]
    parity = (f"parity {p['status']}: max abs diff {p['max_abs_diff']:.2g}, {p['pixels_off']:.2%} pixels off "
              f"({p['samples']} samples)" if p["status"] == "passed" else f"parity {p['status']} ({p['reason']})")
    rate = f" at {s['images_per_s']:.0f} img/s" if s["images_per_s"] else ""
    return (f"generate: {s['images']} images in {s['out']} ({_plan(s)}): {s['written']} "
            f"written, {s['unchanged']} already there{rate}; {parity}")


def _plan(s: dict[str, Any]) -> str:
    """'onnxruntime on cpu, 2 streams of 1 thread, 2 writers': what the defaults picked."""
    from .backends import cpu_settings

    parts, (threads, streams) = [f"{s['backend']} on {s['provider']}"], cpu_settings(s["settings"])
    if s["provider"] == "cpu" and threads:
        each = f"{threads} thread{'s' if threads > 1 else ''}"
        parts.append(f"{streams} streams of {each}" if streams > 1 else each)
    if s["format"] == "png":
        parts.append(f"{s['writers']} writer{'s' if s['writers'] > 1 else ''}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------ export


def _export_formats() -> list[str]:
    from .exporters import EXPORTERS

    return sorted(EXPORTERS)


@cli.command("export")
@click.option("--format", "fmt", type=click.Choice(_export_formats()), default="onnx", show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint or run folder [default: the newest run's last.pt].")
@click.option("--out", type=_Out(file=True), default=None,
              help="Output file [default: runs/<run>/export/generator.onnx or generator.pt; generator-<dtype>.* "
                   "for fp16/bf16].")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: 20].")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="fp16 (ONNX) or bf16 (TorchScript, CPUs with AVX512-BF16/AMX) inside, float32 inputs and outputs.")
@click.option("--atol", type=float, default=None,
              help="Max abs diff allowed against eager [default: fp32 1e-4, fp16 1e-2, bf16 4e-2].")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@handle_errors
def export_cmd(**o: Any) -> None:
    """Export the generator to ONNX or TorchScript, validated against PyTorch at batch 1, 7 and 256."""
    from .checkpoint import newest_checkpoint, resolve
    from .exporters import EXPORTERS, check_options, default_out

    _setup_logging(0, o["quiet"])
    say = (lambda m: None) if o["quiet"] else _echo
    check_options(o["fmt"], opset=o["opset"], dtype=o["dtype"])
    if o["checkpoint"] is None:
        o["checkpoint"] = newest_checkpoint(o["runs_dir"])
        say(f"checkpoint: {o['checkpoint']} (newest run)")
    checkpoint = resolve(o["checkpoint"])
    out = o["out"] or default_out(checkpoint, o["fmt"], o["dtype"])
    if o["out"] is None:
        say(f"out: {out}")
    report = EXPORTERS[o["fmt"]](checkpoint, out, opset=o["opset"], dtype=o["dtype"], atol=o["atol"])
    if o["as_json"]:
        _emit_json(report.to_dict())
    elif not o["quiet"]:
        _echo_export(report)


def _echo_export(r: Any) -> None:
    opset = f", opset {r.opset}" if r.opset else ""
    _echo(f"exported {r.format} ({r.dtype}{opset}): {r.path}  {r.size_bytes / 1e6:.2f} MB  sha256 {r.sha256[:16]}")
    _echo(f"parity at batch {', '.join(map(str, r.batch_sizes))}: max abs diff {r.max_abs_diff:.3g} "
          f"(atol {r.atol:.3g}), mean {r.mean_abs_diff:.3g}, {100 * r.pixels_off:.4g}% uint8 pixels off")
    _echo(f"took {r.seconds:.1f}s (validation {r.validate_seconds:.1f}s)")


# ------------------------------------------------------------------------------------------ info


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@handle_errors
def info(path: Path, as_json: bool) -> None:
    """What a checkpoint, ONNX or TorchScript file or digit classifier holds: kind, I/O, metadata, size, sha256."""
    from .exporters.info import describe

    d = describe(path)
    if as_json:
        _emit_json(d)
        return
    _echo_tree(d)


def _echo_tree(d: dict[str, Any], indent: int = 0) -> None:
    for k, v in d.items():
        if isinstance(v, dict) and v:
            _echo(f"{' ' * indent}{k}:")
            _echo_tree(v, indent + 2)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            _echo(f"{' ' * indent}{k}:")
            for item in v:
                _echo(f"{' ' * (indent + 2)}{item.get('name', '')}: {item.get('dtype', '')} {item.get('shape', '')}")
        else:
            _echo(f"{' ' * indent}{k}: {v}")


# ------------------------------------------------------------------------------------------ classifier, eval

DEFAULT_CLASSIFIER = Path("runs") / "classifier.pt"


@cli.group("classifier")
def classifier_group() -> None:
    """The digit classifier in whose feature space `gantk eval` measures."""


@classifier_group.command("train")
@click.option("--data", default="mnist", show_default=True,
              help="Labelled digits: mnist, synthetic, an IDX file with its labels beside it, digit-named folders, .npz.")
@click.option("--count", type=int, default=None, help="Use the first N images, in file order (a folder: sorted paths; synthetic: render N).")
@click.option("--out", type=_Out(file=True), default=DEFAULT_CLASSIFIER, show_default=True)
@click.option("--epochs", type=int, default=6, show_default=True)
@click.option("--heldout", type=float, default=0.1, show_default=True, help="Share held out to measure accuracy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the split, the order and the weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@handle_errors
def classifier_train(**o: Any) -> None:
    """Train the digit classifier; report and store its held-out accuracy."""
    from .classifier import fit
    from .errors import UsageError

    _setup_logging(0, True)  # warnings: its progress lines are the echo below
    if not 0 < o["heldout"] < 1:
        raise UsageError(f"--heldout is a share of the images: between 0 and 1 (exclusive), got {o['heldout']}")
    if o["epochs"] < 1:
        raise UsageError(f"--epochs must be at least 1, got {o['epochs']}")
    _echo(f"classifier: training on {o['data']} for {_plural(o['epochs'], 'epoch')} -> {o['out']}")

    def progress(ev: dict[str, Any]) -> None:
        _echo(f"  epoch {ev['epoch']}/{ev['epochs']}: loss {ev['loss']:.4f}, held-out accuracy {ev['heldout_accuracy']:.4f}")

    s = fit(o["data"], out=o["out"], count=o["count"], epochs=o["epochs"], heldout=o["heldout"], seed=o["seed"],
            progress=progress)
    if o["as_json"]:
        _emit_json(s)
    else:
        _echo(f"done: held-out accuracy {s['heldout_accuracy']:.4f} on {s['heldout']} of {s['images']} images "
              f"({s['data']}) in {s['seconds']}s; saved {s['out']}")


@cli.command("eval")
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@click.option("--count", type=int, default=None,
              help="Samples to draw from a model [default: 10000]; at most this many from a folder or .npy.")
@click.option("--classifier", "classifier_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="From `gantk classifier train` [default: <runs-dir>/classifier.pt].")
@click.option("--reference", default="mnist", show_default=True, help="Real digits: mnist, synthetic or a path.")
@click.option("--heldout", type=int, default=None,
              help="Real digits held out of --reference (a fixed random draw) for the reference row [default: min(2000, N/5)].")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed for models; subsets of KID.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "tensorrt", "cpu"]), default="auto", show_default=True,
              help="Where a model runs, as for generate.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Reference statistics cache [default: $GANTK_CACHE/eval].")
@click.option("--report", type=_Out(file=True), default=None,
              help="Write a one-page PNG report (of the first source).")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True,
              help="Where the default source (the newest run) and classifier are.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@handle_errors
def eval_cmd(**o: Any) -> None:
    """Score digits (PNG folders, .npy/.npz, checkpoints, ONNX or TorchScript exports) beside held-out real ones.

    Several SOURCES (e.g. the fp32 and fp16 exports of one checkpoint) are scored with the same noise.
    """
    from .checkpoint import newest_checkpoint
    from .errors import UsageError
    from .evaluate import evaluate

    _setup_logging(0, True)  # warnings, as gantk's: its progress lines are the echo below
    if o["count"] is not None and o["count"] < 1:
        raise UsageError(f"--count must be at least 1, got {o['count']}")
    sources = list(o["sources"])
    if not sources:
        sources = [newest_checkpoint(o["runs_dir"])]
        _echo(f"source: {sources[0]} (newest run)")
    classifier = o["classifier_path"] or o["runs_dir"] / "classifier.pt"
    _echo(f"classifier: {classifier}; reference: {o['reference']}")
    doc = evaluate(sources, classifier=classifier, reference=o["reference"], count=o["count"],
                   seed=o["seed"], heldout=o["heldout"], cache_dir=o["cache_dir"], report=o["report"],
                   provider=o["provider"])
    if o["as_json"]:
        _emit_json(doc)
    else:
        _echo_eval(doc)


def _echo_eval(doc: dict[str, Any]) -> None:
    columns = [*doc["rows"], doc["real_heldout"]]
    for j, row in enumerate(doc["rows"]):
        _echo(f"[{j + 1}] {row['source']}")
    _echo(f"{'':<18}" + "".join(f"{f'[{j + 1}]':>18}" for j in range(len(doc["rows"]))) + f"{'real held-out':>18}")
    for key, label in [("count", "N"), ("fid", "FID"), ("kid", "KID x1000"), ("confidence", "confidence"),
                       ("recognised", "recognised share"), ("class_entropy", "mode coverage"),
                       ("precision", "precision"), ("recall", "recall"), ("memorised", "memorised share")]:
        _echo(f"{label:<18}" + "".join(f"{_metric(m, key):>18}" for m in columns))
    for j, row in enumerate(doc["rows"]):
        _echo(f"classes [{j + 1}]       {' '.join(str(c) for c in row['class_hist'])}")
    for w in sorted({w for row in doc["rows"] for w in row["warnings"]}):
        _echo(f"note: {w}")
    if "report" in doc:
        _echo(f"report: {doc['report']}")


def _metric(m: dict[str, Any], key: str) -> str:
    if key == "kid":
        return f"{m['kid'] * 1000:.2f} ± {m['kid_se'] * 1000:.2f}"
    return str(m[key]) if key == "count" else f"{m[key]:.3f}"


# ------------------------------------------------------------------------------------------ bench


def _int_list(text: str, name: str) -> tuple[int, ...]:
    from .errors import UsageError

    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{name} must be comma-separated integers, got {text!r}") from None


@cli.command("bench")
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX export to measure [default: newest run's export, else one made from the checkpoint].")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint for the torch routes and parity [default: the model's source, else newest run's].")
@click.option("--batch-sizes", default="1,64,256", show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True, help="Interleaved repeats (medians).")
@click.option("--count", type=int, default=10000, show_default=True, help="Images for the end-to-end runs.")
@click.option("--threads", default=None,
              help="CPU thread counts, e.g. 2,1 [default: generate's default, 1, all cores]; torch routes use the first.")
@click.option("--no-e2e", is_flag=True, help="Skip the end-to-end generate runs.")
@click.option("--gpu-batch-sizes", default="256,4096,16384", show_default=True, help="Batch sizes of the GPU routes.")
@click.option("--gpu-count", type=int, default=100000, show_default=True, help="Images for the GPU end-to-end runs.")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@handle_errors
def bench_cmd(**o: Any) -> None:
    """Measure every inference route side by side (interleaved, medians): img/s, GFLOP/s, peak share, parity."""
    from .bench import bench, format_table

    _setup_logging(0, False)
    doc = bench(model=o["model"], checkpoint=o["checkpoint"], runs_dir=o["runs_dir"],
                batch_sizes=_int_list(o["batch_sizes"], "--batch-sizes"), repeats=o["repeats"], count=o["count"],
                threads=_int_list(o["threads"], "--threads") if o["threads"] else None, e2e=not o["no_e2e"],
                gpu_batch_sizes=_int_list(o["gpu_batch_sizes"], "--gpu-batch-sizes"), gpu_count=o["gpu_count"],
                progress=lambda msg: _echo(f"bench: {msg}"))
    _emit_json(doc) if o["as_json"] else _echo(format_table(doc))


def main() -> None:
    _PROCESS["own"] = True
    cli(prog_name="gantk")


if __name__ == "__main__":
    main()

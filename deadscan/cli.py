"""The ``deadscan`` command: parse, call the library, print. Nothing imports this module."""

from __future__ import annotations

import shlex
import sys
import warnings
from pathlib import Path

import click

from . import __version__, pipeline
from .data import SPLITS, resource_path
from .defaults import DEFAULTS
from .errors import DeadscanError, DeadscanWarning, printable
from .runfolder import summary_json
from .finetune import Interrupted, TrainConfig
from .strip import CRITERIA, METHODS

SAMPLE_MODEL = "mlp_digits.safetensors"


class _Finite(click.FloatRange):
    """A float range that also refuses nan and inf (a range check alone lets nan through)."""

    def convert(self, value, param, ctx):
        import math

        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return value


def _echo(text: str = "", err: bool = False) -> None:
    """click.echo with control characters escaped: names and paths may come from files (terminal escapes)."""
    click.echo("\n".join(printable(line) for line in str(text).split("\n")), err=err)


class _Error(click.ClickException):
    """One ``Error:`` line, escaped like everything else printed."""

    def __init__(self, message: str):
        super().__init__(" ".join(printable(message).split()))


def _command_line() -> str:
    return "deadscan " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _resume_command() -> str:
    return _command_line() + ("" if "--resume" in sys.argv[1:] else " --resume")


def _warnings_as_lines(ctx: click.Context) -> None:
    """deadscan's own warnings (NaN weights, out-of-memory retries) print as one ``Warning:`` line on stderr."""
    ctx.with_resource(warnings.catch_warnings())
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeadscanWarning):
            _echo(f"Warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)
    warnings.showwarning = show


def _list_globals(ctx: click.Context, _param, value) -> None:
    if value is None or ctx.resilient_parsing:
        return
    from .checkpoint import list_globals

    _echo(_run(list_globals, value).describe())
    ctx.exit(0)


_allow_global_option = click.option(
    "--allow-global", "allow_global", multiple=True, metavar="NAME",
    help="let the pickle import this class or function (repeatable; names from --list-globals): imports it, "
         "and its code runs as the pickle builds objects with it")
_overwrite_option = click.option("--overwrite", is_flag=True, help="replace outputs an earlier run left in --out")


def _run(fn, *args, **kwargs):
    """Call the library; its errors become one ``Error:`` line and exit 1."""
    try:
        return fn(*args, **kwargs)
    except DeadscanError as e:
        raise _Error(str(e)) from None
    except KeyboardInterrupt:
        raise _Error("interrupted; nothing was written") from None


def _print_inspection(result: pipeline.Inspection, as_json: bool) -> None:
    from .report import format_table

    if as_json:
        _echo(summary_json(result.summary, indent=2))
        return
    s = result.summary
    ck = s["checkpoint"]
    _echo(f"checkpoint {ck['path']} ({ck['format']}, arch {ck['arch'] or 'pickled module'})")
    _echo(f"data {s['data']['name']} split {s['data']['split']}: {s['data']['samples']} samples on {s['device']}")
    _echo("")
    _echo(format_table(s))
    _echo("")
    for path in (result.files or {}).values():  # stats.h5, report.html
        _echo(f"wrote {path}")
    _echo(f"wrote {result.summary_path}")


@click.group()
@click.version_option(__version__, prog_name="deadscan")
def main():
    """Find dead ReLU neurons, measure the capacity they waste, and revive them.

    A neuron is dead when its output is exactly zero on every element of the scanned data.
    """
    _warnings_as_lines(click.get_current_context())


def _scan_options(f):
    options = [
        click.option("--data", "data", required=True, help="digits, cifar10, cifar100, svhn, mnist, fashion-mnist, tiny-imagenet, cifar10-c, cifar100-c, imagefolder:PATH, fake[:CxHxW[:CLASSES[:N]]], or a .npz/.h5 file (arrays x, y)"),
        click.option("--arch", default=None, help="architecture for plain state dicts, e.g. 'mlp(depth=2, width=256)' or torchvision:resnet18"),
        click.option("--split", type=click.Choice(SPLITS), default=DEFAULTS.split, show_default=True, help="data split to scan (val: seeded hold-out of train)"),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="scan only the first N samples of the split"),
        click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size, show_default=True),
        click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)"),
        click.option("--tau", type=click.FloatRange(min=0), default=DEFAULTS.tau, show_default=True, help="ReDo dormancy threshold"),
        click.option("--data-root", default=None, help="folder holding torchvision datasets (default ~/.cache/deadscan/data)"),
        click.option("--download", is_flag=True, help="download a torchvision dataset if missing"),
        click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="seed of the train/val/test split"),
        click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=DEFAULTS.val_fraction, show_default=True, help="share of the training set held out as val"),
        click.option("--mean", default=None, help="per-channel mean, e.g. 0.5,0.5,0.5 (default: the dataset's preset)"),
        click.option("--std", default=None, help="per-channel std, e.g. 0.25,0.25,0.25 (default: the dataset's preset)"),
        click.option("--resize", type=click.IntRange(min=1), default=None, help="resize images to N x N"),
        click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="convert images to 1 (grey) or 3 (RGB) channels"),
        click.option("--corruption", default=None, help="cifar10-c/cifar100-c corruptions, comma-separated (default: all)"),
        click.option("--severity", default=None, help="cifar10-c/cifar100-c severities 1-5, comma-separated (default: all)"),
        click.option("--out", default=DEFAULTS.out_dir, show_default=True, help="output folder"),
        click.option("--json", "as_json", is_flag=True, help="print summary.json to stdout instead of the table"),
        click.option("--trust-pickle", is_flag=True, help="allow pickled modules and TorchScript: RUNS CODE from the file"),
        _allow_global_option,
        _overwrite_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


_plotlyjs_option = click.option(
    "--plotlyjs", type=click.Choice(["inline", "cdn", "directory"]), default="inline", show_default=True,
    help="report.html: plotly.js inlined (works offline), from the CDN, or as plotly.min.js beside it")


@main.command()
@click.argument("checkpoint")
@_scan_options
@_plotlyjs_option
@click.option("--list-globals", metavar="FILE", is_eager=True, expose_value=False, callback=_list_globals,
              help="list the classes and functions the pickle in FILE would import (read from its opcodes: "
                   "nothing is imported or run), then exit")
def inspect(checkpoint, data, arch, split, limit, batch_size, device, tau, data_root, download, seed, out,
            as_json, trust_pickle, plotlyjs, allow_global, overwrite, **data_options):
    """Scan CHECKPOINT on a dataset: dead neurons per ReLU site and %A.

    Prints a per-site table and totals, and writes summary.json, stats.h5 and report.html to --out.

    Example:

        deadscan inspect sample_models/mlp_digits.safetensors --data digits
    """
    result = _run(pipeline.inspect, checkpoint, data, out=out, arch=arch, trust_pickle=trust_pickle,
                  split=split, limit=limit, batch_size=batch_size, device=device, tau=tau,
                  data_root=data_root, download=download, seed=seed, command=_command_line(),
                  progress=not as_json, plotlyjs=plotlyjs, overwrite=overwrite, allow_globals=allow_global,
                  **data_options)
    _print_inspection(result, as_json)


@main.command()
@click.option("--out", default=DEFAULTS.out_dir, show_default=True, help="output folder")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
@_overwrite_option
def demo(out, device, overwrite):
    """Inspect the bundled sample MLP on the bundled digits data (no download).

    Example:

        deadscan demo --out demo-out
    """
    model = resource_path("sample_models", SAMPLE_MODEL)
    _echo(f"deadscan demo: the paper's MLP trained on sklearn's digits ({model.name})\n")
    previous = pipeline.summary_in(Path(out))  # a demo may redo its own folder (the same model and data)
    own = ((previous.get("checkpoint") or {}).get("path") == str(model)
           and (previous.get("data") or {}).get("name") == "digits")
    result = _run(pipeline.inspect, model, "digits", out=out, device=device, command=_command_line(), progress=True,
                  overwrite=overwrite or own)
    _print_inspection(result, as_json=False)
    _echo(f"outputs in {result.summary_path.parent}/")


@main.command()
@click.argument("checkpoint", required=False)
@click.option("--data", default=None, help="dataset (default: the one the last inspect in --from used)")
@click.option("--arch", default=None, help="architecture for plain state dicts")
@click.option("--from", "from_dir", default=DEFAULTS.out_dir, show_default=True, help="folder of the inspect run to reuse when CKPT is omitted")
@click.option("--finetune", "epochs", type=click.IntRange(min=0), default=TrainConfig.epochs, show_default=True, help="epochs of fine-tuning; 0 = one strip step and a re-scan")
@click.option("--every", type=click.IntRange(min=1), default=TrainConfig.every, show_default=True, help="strip every K epochs")
@click.option("--rate", type=click.FloatRange(0, 1, min_open=True), default=TrainConfig.rate, show_default=True, help="fraction of a dead neuron's remaining incoming weights pruned per step")
@click.option("--criterion", type=click.Choice(CRITERIA), default=TrainConfig.criterion, show_default=True, help="rank by weight (paper) or by w * E[x]")
@click.option("--method", type=click.Choice(METHODS), default=TrainConfig.method, show_default=True, help="strip (Synaptic Stripping) or redo (re-initialise dead neurons, a baseline)")
@click.option("--optimizer", type=click.Choice(["adam", "adamw"]), default=TrainConfig.optimizer, show_default=True)
@click.option("--lr", type=_Finite(0, min_open=True), default=TrainConfig.lr, show_default=True, help="peak learning rate")
@click.option("--weight-decay", type=_Finite(0), default=TrainConfig.weight_decay, show_default=True, help="optimizer weight decay")
@click.option("--warmup", type=click.IntRange(min=0), default=TrainConfig.warmup, show_default=True, help="epochs of linear warm-up")
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default=TrainConfig.schedule, show_default=True)
@click.option("--final-lr", type=_Finite(0), default=TrainConfig.final_lr, show_default=True, help="learning rate at the end of the cosine schedule")
@click.option("--batch-size", type=click.IntRange(min=1), default=TrainConfig.batch_size, show_default=True)
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--baseline", is_flag=True, help="also run the same fine-tuning without stripping, for a side-by-side")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its last completed epoch")
@click.option("--compact", is_flag=True, help="also write compact.safetensors with the still-dead neurons removed")
@click.option("--augment", default=TrainConfig.augment, show_default=True, help="training augmentation: default (crop+flip for CIFAR-like images), none, or crop/flip/autoaugment joined with +")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=None, help="share of the training set held out as val (default 0.1, or the inspect's)")
@click.option("--mean", default=None, help="per-channel mean, e.g. 0.5,0.5,0.5 (default: the dataset's preset)")
@click.option("--std", default=None, help="per-channel std (default: the dataset's preset)")
@click.option("--resize", type=click.IntRange(min=1), default=None, help="resize images to N x N")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="convert images to 1 or 3 channels")
@click.option("--test-corrupted", default=None, help="also evaluate on a corrupted test set at the end, e.g. cifar10-c")
@click.option("--corruption", default=None, help="with --test-corrupted: corruptions, comma-separated (default: all)")
@click.option("--severity", default=None, help="with --test-corrupted: severities 1-5, comma-separated (default: all)")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
@click.option("--data-root", default=None, help="folder holding torchvision datasets")
@click.option("--download", is_flag=True, help="download a torchvision dataset if missing")
@click.option("--out", default=DEFAULTS.out_dir, show_default=True, help="output folder")
@click.option("--trust-pickle", is_flag=True, help="allow pickled modules and TorchScript: RUNS CODE from the file")
@_allow_global_option
@_overwrite_option
@_plotlyjs_option
def strip(checkpoint, data, arch, from_dir, epochs, every, rate, criterion, method, optimizer, lr, weight_decay, warmup,
          schedule, final_lr, batch_size, seed, baseline, resume, compact, augment, val_fraction, mean, std, resize,
          channels, test_corrupted, corruption, severity, device, data_root, download, out, trust_pickle, plotlyjs,
          allow_global, overwrite):
    """Revive dead neurons with Synaptic Stripping while fine-tuning.

    After each epoch: scan the validation split, prune the most negative remaining incoming
    weights of every dead neuron (a fraction --rate), log a history row. Writes
    stripped.safetensors (+ masks.safetensors), summary.json with the history, stats.h5 and
    report.html to --out.

    Example:

        deadscan strip sample_models/mlp_digits.safetensors --data digits --finetune 5 --warmup 0
    """
    cfg = TrainConfig(epochs=epochs, every=every, rate=rate, criterion=criterion, method=method, optimizer=optimizer, lr=lr,
                      weight_decay=weight_decay, warmup=warmup, schedule=schedule, final_lr=final_lr,
                      batch_size=batch_size, seed=seed, augment=augment)
    data_options = {"val_fraction": val_fraction, "mean": mean, "std": std, "resize": resize, "channels": channels}

    def on_epoch(row):
        _echo(f"epoch {row['epoch']:>3}  dead {row['dead']:>5}  revived {row['revived']:>4}  "
                   f"pruned {row['pruned_weights']:>7}  %A {row['active_percent']:6.2f}  "
                   f"train loss {row['train_loss']:.4f}  val acc {row['val_acc']:.2f}")

    try:
        run = pipeline.strip_checkpoint(checkpoint, data, cfg=cfg, out=out, from_dir=from_dir, arch=arch,
                                        trust_pickle=trust_pickle, baseline=baseline, resume=resume, device=device,
                                        data_root=data_root, download=download, command=_command_line(),
                                        compact=compact, on_epoch=on_epoch, progress=True, plotlyjs=plotlyjs,
                                        data_options=data_options, corrupted=test_corrupted,
                                        corrupted_options={"corruption": corruption, "severity": severity},
                                        overwrite=overwrite, allow_globals=allow_global)
    except Interrupted as e:
        raise _Error(f"{e}; resume with: {_resume_command()}") from None
    except DeadscanError as e:
        raise _Error(str(e)) from None
    except KeyboardInterrupt:  # outside the training loop (loading, the final scan, writing)
        raise _Error(f"interrupted; completed epochs are kept in {out}; resume with: "
                                   f"{_resume_command()}") from None
    s = run.summary
    t = s["totals"]
    _echo(f"\nafter stripping: dead {t['dead']} of {t['neurons']}  %A {t['active_percent']:.2f}  "
               f"pruned weights {t['pruned_weights']}  test acc {_fmt(s['test'].get('acc'))}")
    if "test_corrupted" in s:
        _echo(f"corrupted test ({s['test_corrupted']['name']}): acc {_fmt(s['test_corrupted']['acc'])}  "
                   f"NLL {_fmt(s['test_corrupted']['loss'])}")
    if "baseline" in s:
        b = s["baseline"]["history"][-1] if s["baseline"]["history"] else {}
        _echo(f"baseline (no stripping): dead {b.get('dead')}  %A {_fmt(b.get('active_percent'))}  "
                   f"test acc {_fmt(s['baseline']['test'].get('acc'))}")
    if "compact" in s:
        c = s["compact"]
        _echo(f"compact: removed {sum(c['removed'].values())} dead neurons, params {c['params_before']} -> "
                   f"{c['params_after']}, max abs output diff {c['max_abs_diff']:.3g}, CPU latency "
                   f"{c['cpu_latency_ms_before']:.3f} -> {c['cpu_latency_ms_after']:.3f} ms")
    for name, path in run.files.items():
        _echo(f"wrote {path}")


@main.command()
@click.argument("stats")
@click.option("--out", default=None, help="output folder (default: the folder holding STATS)")
@_plotlyjs_option
def report(stats, out, plotlyjs):
    """Re-render report.html from a stats.h5 alone (no model or data needed).

    Example:

        deadscan report deadscan-out/stats.h5 --out paper
    """
    from .report import rerender

    _echo(f"wrote {_run(rerender, stats, out, plotlyjs=plotlyjs)}")


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--out", default=DEFAULTS.out_dir, show_default=True, help="output folder (compare.html)")
@_plotlyjs_option
def compare(a, b, out, plotlyjs):
    """Compare two runs side by side: per-site dead and %A deltas (B - A), overlaid histograms.

    A and B are stats.h5 files written by inspect or strip; writes compare.html to --out.

    Example:

        deadscan compare base/stats.h5 stripped/stats.h5 --out compare-out
    """
    from .report import compare as compare_runs

    _echo(f"wrote {_run(compare_runs, a, b, out, plotlyjs=plotlyjs)}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":  # pragma: no cover
    main()

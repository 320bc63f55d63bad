"""The ``deadscan`` command: parse, call the library, print. Nothing imports this module.

Only commands that load a model import torch (through deadscan.pipeline, inside the command): help,
--version, usage errors, report and compare start without it."""

from __future__ import annotations

import os
import shlex
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import click

from . import __version__
from .defaults import DEFAULTS
from .errors import DeadscanError, DeadscanNote, DeadscanWarning, printable
from .options import CRITERIA, METHODS, OPTIMIZERS, PRUNE_RULES, SCHEDULES, SPLITS, TrainConfig

SAMPLE_MODEL = "mlp_digits.safetensors"
SAMPLE_LM, SAMPLE_LM_TEXT, SAMPLE_LM_SEQ_LEN = "opt_pydoc", "pydoc_val.txt", 64  # demo --lm


class _Finite(click.FloatRange):
    """A float range that also refuses nan and inf (a range check alone lets nan through)."""

    def convert(self, value, param, ctx):
        import math

        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return value


class _Command(click.Command):
    """A command whose options print in sections (``sections``: title -> option names, in order)."""

    def __init__(self, *args, sections: dict[str, tuple[str, ...]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sections = sections or {}

    def format_options(self, ctx, formatter):
        where = {name: (title, i) for title, names in self.sections.items() for i, name in enumerate(names)}
        other = "Other options" if self.sections else "Options"
        rows: dict[str, list] = {title: [] for title in [*self.sections, other]}
        for n, p in enumerate(self.get_params(ctx)):
            record = p.get_help_record(ctx) if isinstance(p, click.Option) else None
            if record:
                title, i = where.get(p.name, (other, n))
                rows[title].append((i, record))
        terms = [len(term) for records in rows.values() for _, (term, _) in records]
        width = max([n for n in terms if n <= 30], default=0)  # longer terms get a line of their own
        for title, records in rows.items():
            if records:  # in the section's order, terms padded alike so the help columns line up
                with formatter.section(title):
                    formatter.write_dl([(term.ljust(width), text) for _, (term, text) in sorted(records)])


def _echo(text: str = "", err: bool = False) -> None:
    """click.echo with control characters escaped: names and paths may come from files (terminal escapes)."""
    click.echo("\n".join(printable(line) for line in str(text).split("\n")), err=err)


class _Error(click.ClickException):
    """One ``Error:`` line, escaped like everything else printed."""

    def __init__(self, message: str):
        super().__init__(" ".join(printable(message).split()))


_STARTED = "deadscan.started"  # ctx.meta key: when the command started (time.perf_counter)
_STRIP_OUT = "deadscan.strip_out"  # ctx.meta key: set while strip runs, so an interrupt says how to resume


class _Group(click.Group):
    """The one place library errors become an ``Error:`` line (exit 1)."""

    command_class = _Command

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
            from .distributed import finish  # torch-free; a no-op outside torchrun

            finish()  # under torchrun every process ends together
            return result
        except DeadscanError as e:
            if not _main_process():  # under torchrun process 0 prints the error (another's as "process N: ...")
                _exit_quietly(1)
            raise _Error(_error_message(ctx, e)) from None
        except click.UsageError:
            if not _main_process():  # every process parsed the same command line: process 0 says it once
                _exit_quietly(2)
            raise
        except KeyboardInterrupt:
            if not _main_process():
                _exit_quietly(1)
            out = ctx.meta.get(_STRIP_OUT)
            if out is None:
                raise _Error("interrupted; nothing was written") from None
            # outside strip's training loop (loading, the final scan, writing)
            raise _Error(f"interrupted; completed epochs are kept in {out}; resume with: {_resume_command()}") from None
        except BrokenPipeError:  # e.g. `deadscan inspect ... | head -1`: the reader left; nothing to say
            # what stdout still buffers goes to /dev/null, so the final flush prints no traceback either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)


_QUIET_EXIT_GRACE_S = 10.0


def _exit_quietly(code: int):
    """A torchrun process other than 0 ends on an error that process 0 says. torchrun stops every process as
    soon as one exits: leaving at once could stop process 0 before it prints (it may have started later).
    Process 0 usually exits first, and torchrun then stops this one during the wait."""
    time.sleep(_QUIET_EXIT_GRACE_S)
    raise click.exceptions.Exit(code) from None


def _main_process() -> bool:
    """False in a torchrun process other than 0: it keeps stdout and stderr quiet."""
    from .distributed import launched

    return launched().is_main


def _one_process() -> bool:
    from .distributed import launched

    return launched().world == 1


def _error_message(ctx: click.Context, e: DeadscanError) -> str:
    if ctx.meta.get(_STRIP_OUT) is not None:
        from .finetune import Interrupted  # already imported by strip

        if isinstance(e, Interrupted):
            return f"{e}; resume with: {_resume_command()}"
    return str(e)


def _started() -> float | None:
    return click.get_current_context().meta.get(_STARTED)


def _command_line() -> str:
    return "deadscan " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _resume_command() -> str:
    """How to go on after an interrupt: resume the run, or write the completed epochs' outputs."""
    given = [a for a in sys.argv[1:] if a not in ("--resume", "--finalize")]
    line = " ".join(["deadscan", *map(shlex.quote, given)])
    if not _one_process():  # the options torchrun was given are not known here
        line = "torchrun <the same torchrun options> -m " + line
    return f"{line} --resume; or write the completed epochs' outputs with: {line} --finalize"


def _warnings_as_lines(ctx: click.Context) -> None:
    """deadscan's own warnings (NaN weights, out-of-memory retries) print as one ``Warning:`` line on stderr."""
    ctx.with_resource(warnings.catch_warnings())
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeadscanWarning):
            if _main_process():
                _echo(f"{'Note' if issubclass(category, DeadscanNote) else 'Warning'}: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)
    warnings.showwarning = show


def _list_globals(ctx: click.Context, _param, value) -> None:
    if value is None or ctx.resilient_parsing:
        return
    from .checkpoint import list_globals

    _echo(list_globals(value).describe())
    ctx.exit(0)


def _print_inspection(result, as_json: bool) -> None:
    from .report import format_table
    from .runfolder import summary_json

    if as_json:
        _echo(summary_json(result.summary, indent=2))
        return
    s = result.summary
    ck = s["checkpoint"]
    _echo(f"checkpoint {ck['path']} ({ck['format']}, arch {ck['arch'] or 'pickled module'})")
    d = s["data"]
    where = f" in {s['processes']} processes (torchrun)" if s.get("processes", 1) > 1 else ""
    if d.get("kind") == "tokens":  # padded positions are not part of the scanned data
        _echo(f"data {d['name']} split {d['split']}: {d['samples']} sequences of {d.get('seq_len')}, "
              f"{d.get('tokens')} tokens (padding excluded) on {s['device']}{where}")
    else:
        _echo(f"data {d['name']} split {d['split']}: {d['samples']} samples on {s['device']}{where}")
    if s.get("device_map"):
        _echo(f"device map: {_placement(s['device_map'])} (all in summary.json)")
    _echo("")
    _echo(format_table(s))
    _echo("")
    for path in (result.files or {}).values():  # stats.h5, report.html
        _echo(f"wrote {path}")
    _echo(f"wrote {result.summary_path}")


def _placement(device_map: dict[str, str]) -> str:
    """``cpu: 4 modules; disk: model.decoder.layers``: each device, with its modules if one or two."""
    on: dict[str, list[str]] = {}
    for module, device in device_map.items():
        on.setdefault(device, []).append(module or "(the whole model)")
    return "; ".join(f"{d}: {', '.join(m) if len(m) <= 2 else f'{len(m)} modules'}" for d, m in on.items())


@click.group(cls=_Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deadscan", help="print the version and exit")
@click.pass_context
def main(ctx):
    """Start with `deadscan demo` (a bundled model and data; no download, no GPU).

    Find dead ReLU neurons, measure the capacity they waste, and revive them. A neuron is dead when
    its output is exactly zero on every element of the scanned data.

    \b
    Examples:
      deadscan demo --out demo-out
      deadscan inspect model.safetensors --data cifar10 --out base
      deadscan strip --from base --finetune 50 --out stripped
      deadscan compare base/stats.h5 stripped/stats.h5 --out compare-out

    `deadscan COMMAND -h` shows a command's options.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(0)
    ctx.meta[_STARTED] = time.perf_counter()  # a run's time includes importing torch and loading
    _warnings_as_lines(ctx)


# Options shared by every command that writes a run folder.
_allow_global_option = click.option(
    "--allow-global", "allow_global", multiple=True, metavar="NAME",
    help="let the pickle import this class or function (repeatable; names from --list-globals): imports it, "
         "and its code runs as the pickle builds objects with it")
_trust_pickle_option = click.option(
    "--trust-pickle", is_flag=True, help="allow pickled modules and TorchScript: RUNS CODE from the file")
_csv_option = click.option("--csv", "csv", is_flag=True,
                           help="also write sites.csv and neurons.csv (one row per site, per neuron) to --out")
_overwrite_option = click.option("--overwrite", is_flag=True, help="replace outputs an earlier run left in --out")
_device_option = click.option("--device", metavar="DEVICE", default=None,
                              help="cpu, cuda or cuda:N (default: cuda if available)")
_plotlyjs_option = click.option(
    "--plotlyjs", type=click.Choice(["inline", "cdn", "directory"]), default=DEFAULTS.plotlyjs, show_default=True,
    help="report.html: plotly.js inlined (works offline), from the CDN, or as plotly.min.js beside it")


def _data_options(*, reuse: bool, corrupted: str):
    """--data and how it is read, for inspect and strip. ``reuse``: strip, whose unset options (None) come
    from the inspect run it reuses. ``corrupted``: the option naming the CIFAR-C set --corruption applies to."""
    inherited = ", or the inspect's" if reuse else ""
    options = [
        click.option("--data", metavar="DATA", required=not reuse,
                     help=("dataset (default: the one the inspect in --from used): " if reuse else "dataset: ")
                     + "digits, cifar10, cifar100, svhn, mnist, fashion-mnist, tiny-imagenet, cifar10-c, cifar100-c, "
                       "imagefolder:PATH, fake[:CxHxW[:CLASSES[:N]]], a .npz/.h5 file (arrays x, y; or input_ids "
                       "and attention_mask for a language model), or a .txt/.jsonl/.parquet text corpus"),
        click.option("--arch", metavar="SPEC", default=None,
                     help="architecture for plain state dicts, e.g. 'mlp(depth=2, width=256)' or torchvision:resnet18"
                          + (" (default: the checkpoint's own, or the inspect's)" if reuse else "")),
        click.option("--data-root", metavar="DIR", default=None,
                     help=f"folder holding torchvision datasets (default: ~/.cache/deadscan/data{inherited})"),
        click.option("--download", is_flag=True, help="download a torchvision dataset if missing"),
        click.option("--val-fraction", metavar="FRACTION", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help=f"share of the training set held out as val (default: {DEFAULTS.val_fraction}{inherited})"),
        click.option("--split-seed", metavar="N", type=int, default=None,
                     help=f"seed of the train/val/test split (default: {DEFAULTS.seed}{inherited})"),
        click.option("--mean", metavar="M,M,M", default=None,
                     help=f"per-channel mean, e.g. 0.5,0.5,0.5 (default: the dataset's preset{inherited})"),
        click.option("--std", metavar="S,S,S", default=None,
                     help=f"per-channel std, e.g. 0.25,0.25,0.25 (default: the dataset's preset{inherited})"),
        click.option("--resize", metavar="N", type=click.IntRange(min=1), default=None,
                     help=f"resize images to N x N (default: keep their size{inherited})"),
        click.option("--channels", type=click.Choice(["1", "3"]), default=None,
                     help=f"convert images to 1 (grey) or 3 (RGB) channels (default: keep them{inherited})"),
        click.option("--corruption", metavar="NAMES", default=None,
                     help=f"corruptions of {corrupted}, comma-separated (default: all)"),
        click.option("--severity", metavar="LEVELS", default=None,
                     help=f"severities 1-5 of {corrupted}, comma-separated (default: all)"),
        click.option("--seq-len", metavar="N", type=click.IntRange(min=1), default=None,
                     help="text data: tokens per packed sequence (default: 512, or the tokenizer's maximum)"),
        click.option("--tokenizer", metavar="DIR", default=None,
                     help="text data: folder holding the tokenizer (default: the model folder's own)"),
        click.option("--text-field", metavar="NAME", default=None,
                     help="text data (.jsonl, .parquet): the field holding the text (default: text)"),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


_DATA_KEYS = ("data", "data_root", "download", "split_seed", "val_fraction", "mean", "std", "resize", "channels",
              "corruption", "severity", "seq_len", "tokenizer", "text_field")


def _pop_data(kw: dict):
    """The DataOptions the shared data options gave (removed from ``kw``; None where not given)."""
    from .options import DataOptions

    given = {k: kw.pop(k) for k in _DATA_KEYS}
    given["name"], given["root"] = given.pop("data"), given.pop("data_root")
    if given["channels"] is not None:
        given["channels"] = int(given["channels"])
    return DataOptions(**given)


_INSPECT_SECTIONS = {
    "Data": ("data", "split", "limit", "split_seed", "val_fraction", "data_root", "download", "mean", "std", "resize",
             "channels", "corruption", "severity", "seq_len", "tokenizer", "text_field"),
    "Model": ("arch", "trust_pickle", "allow_global", "list_globals"),
    "Scan": ("batch_size", "device", "device_map", "max_memory", "tau"),
    "Output": ("out", "as_json", "csv", "plotlyjs", "overwrite"),
}


@main.command(sections=_INSPECT_SECTIONS)
@click.argument("checkpoint")
@_data_options(reuse=False, corrupted="a cifar10-c/cifar100-c --data")
@click.option("--split", type=click.Choice(SPLITS), default=DEFAULTS.split, show_default=True,
              help="data split to scan (val: seeded hold-out of train)")
@click.option("--limit", metavar="N", type=click.IntRange(min=1), default=None,
              help="scan only the first N samples of the split")
@click.option("--seed", "old_seed", type=int, default=None, hidden=True)  # before --split-seed
@_trust_pickle_option
@_allow_global_option
@click.option("--list-globals", metavar="FILE", is_eager=True, expose_value=False, callback=_list_globals,
              help="list the classes and functions the pickle in FILE would import (read from its opcodes: "
                   "nothing is imported or run), then exit")
@click.option("--batch-size", metavar="N", type=click.IntRange(min=1), default=DEFAULTS.batch_size, show_default=True,
              help="samples per scan batch")
@_device_option
@click.option("--device-map", metavar="MAP", default=None,
              help="a model bigger than one device: place its layers over the GPUs, CPU memory and "
                   "disk with accelerate: auto, balanced, balanced_low_0, sequential, or a JSON object (or .json "
                   "file) of module name to device (N, cuda:N, mps, cpu, disk)")
@click.option("--max-memory", metavar="SPEC", default=None,
              help="with --device-map auto|balanced|sequential: memory per device, e.g. cpu=2GiB or "
                   "0=10GiB,cpu=30GiB or {\"0\": \"10GiB\", \"cpu\": \"30GiB\"} (what does not fit goes to disk)")
@click.option("--tau", metavar="TAU", type=click.FloatRange(min=0), default=DEFAULTS.tau, show_default=True,
              help="ReDo dormancy threshold")
@click.option("--out", metavar="DIR", default=DEFAULTS.out_dir, show_default=True, help="output folder")
@click.option("--json", "as_json", is_flag=True, help="print summary.json to stdout instead of the table")
@_csv_option
@_plotlyjs_option
@_overwrite_option
def inspect(checkpoint, arch, split, limit, old_seed, batch_size, device, device_map, max_memory, tau, out, as_json,
            csv, trust_pickle, plotlyjs, allow_global, overwrite, **data_kw):
    """Scan CHECKPOINT on a dataset: dead neurons per ReLU site and %A.

    Prints a per-site table and totals, and writes summary.json, stats.h5 and report.html to --out
    (with --csv also sites.csv and neurons.csv).

    \b
    Example:
      deadscan inspect sample_models/mlp_digits.safetensors --data digits
    """
    from . import pipeline
    from .options import LoadOptions, OutputOptions

    if old_seed is not None and data_kw["split_seed"] is None:
        data_kw["split_seed"] = old_seed
    placement = _device_map(device_map, max_memory)
    result = pipeline.inspect(checkpoint, _pop_data(data_kw), split=split, limit=limit,
                              load=LoadOptions(arch, trust_pickle, allow_global),
                              output=OutputOptions(out, overwrite, plotlyjs, csv), batch_size=batch_size,
                              device=device, tau=tau, command=_command_line(), progress=not as_json,
                              started=_started(), device_map=placement)
    if result.main:
        _print_inspection(result, as_json)


def _device_map(device_map: str | None, max_memory: str | None):
    """--device-map and --max-memory as a deadscan.devmap.DeviceMap (None: neither given)."""
    from .devmap import DeviceMap, DeviceMapError

    if device_map is None:
        if max_memory is not None:
            raise DeviceMapError("--max-memory applies with --device-map: add --device-map auto (or balanced, "
                                 "sequential)")
        return None
    return DeviceMap.parse(device_map, max_memory)


@main.command()
@click.option("--out", metavar="DIR", default=DEFAULTS.out_dir, show_default=True, help="output folder")
@click.option("--lm", is_flag=True,
              help="the bundled small ReLU language model (OPT) on bundled held-out text instead (needs transformers)")
@_device_option
@_overwrite_option
def demo(out, lm, device, overwrite):
    """Inspect the bundled sample MLP on the bundled digits data (no download).

    With --lm: the bundled OPT-style ReLU language model (sample_models/opt_pydoc, trained on the Python
    docs' pydoc topics) on the topics held out from its training (pydoc_val.txt, --seq-len 64, all of it).

    \b
    Examples:
      deadscan demo --out demo-out
      deadscan demo --lm --out demo-lm
    """
    from . import pipeline
    from .options import DataOptions, OutputOptions
    from .resources import resource_path
    from .runfolder import summary_or_empty

    say = _echo if _main_process() else (lambda *_: None)
    if lm:
        model = resource_path("sample_models", SAMPLE_LM)
        text = resource_path("sample_models", SAMPLE_LM_TEXT)
        say(f"deadscan demo --lm: a small ReLU OPT trained on Python's pydoc topics ({model.name}), "
            f"on held-out topics ({text.name})\n")
        data, split = DataOptions(str(text), seq_len=SAMPLE_LM_SEQ_LEN), "all"
    else:
        model = resource_path("sample_models", SAMPLE_MODEL)
        say(f"deadscan demo: the paper's MLP trained on sklearn's digits ({model.name})\n")
        data, split = DataOptions("digits"), DEFAULTS.split
    previous = summary_or_empty(out)  # a demo may redo its own folder (the same model and data)
    own = ((previous.get("checkpoint") or {}).get("path") == str(model)
           and (previous.get("data") or {}).get("name") == data.name)
    result = pipeline.inspect(model, data, split=split, output=OutputOptions(out, overwrite or own), device=device,
                              command=_command_line(), progress=True, started=_started())
    if result.main:
        _print_inspection(result, as_json=False)
        _echo(f"outputs in {result.summary_path.parent}/")


_STRIP_SECTIONS = {
    "Input": ("from_dir", "arch", "trust_pickle", "allow_global"),
    "Data": ("data", "data_root", "download", "split_seed", "val_fraction", "mean", "std", "resize", "channels",
             "augment", "test_corrupted", "corruption", "severity", "seq_len", "tokenizer", "text_field"),
    "Training": ("epochs", "optimizer", "lr", "weight_decay", "warmup", "schedule", "final_lr", "batch_size",
                 "grad_accum", "train_seed", "device", "device_map", "baseline", "resume", "finalize"),
    "Stripping": ("every", "rate", "prune_rule", "criterion", "method", "compact"),
    "Output": ("out", "csv", "plotlyjs", "overwrite"),
}
_TRAIN = TrainConfig()


@main.command(sections=_STRIP_SECTIONS)
@click.argument("checkpoint", required=False)
@click.option("--from", "from_dir", metavar="DIR", default=DEFAULTS.out_dir, show_default=True,
              help="folder of the inspect run to reuse when CHECKPOINT is omitted")
@_data_options(reuse=True, corrupted="--test-corrupted")
@click.option("--finetune", "epochs", metavar="EPOCHS", type=click.IntRange(min=0), default=_TRAIN.epochs,
              show_default=True, help="epochs of fine-tuning; 0 = one strip step and a re-scan")
@click.option("--every", metavar="K", type=click.IntRange(min=1), default=_TRAIN.every, show_default=True,
              help="strip every K epochs")
@click.option("--rate", metavar="R", type=click.FloatRange(0, 1, min_open=True), default=_TRAIN.rate,
              show_default=True, help="fraction of a dead neuron's remaining incoming weights pruned per step")
@click.option("--prune-rule", type=click.Choice(PRUNE_RULES), default=_TRAIN.prune_rule, show_default=True,
              help="floor: the max(1, floor(R x remaining)) most negative weights; reference: every weight below "
                   "the R-quantile of the remaining ones, any sign (the paper's reference code)")
@click.option("--criterion", type=click.Choice(CRITERIA), default=_TRAIN.criterion, show_default=True,
              help="rank by weight (paper) or by w * E[x] (for layers whose inputs can be negative)")
@click.option("--method", type=click.Choice(METHODS), default=_TRAIN.method, show_default=True,
              help="strip (Synaptic Stripping) or redo (re-initialise dead neurons, a baseline)")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=_TRAIN.optimizer, show_default=True,
              help="AdamW (decoupled weight decay; the paper's) or Adam (L2 weight decay)")
@click.option("--lr", metavar="LR", type=_Finite(0, min_open=True), default=_TRAIN.lr, show_default=True,
              help="peak learning rate")
@click.option("--weight-decay", metavar="WD", type=_Finite(0), default=_TRAIN.weight_decay, show_default=True,
              help="optimizer weight decay (the paper's: 5e-5)")
@click.option("--warmup", metavar="EPOCHS", type=click.IntRange(min=0), default=_TRAIN.warmup, show_default=True,
              help="epochs of linear warm-up from 0 to --lr")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_TRAIN.schedule, show_default=True,
              help="learning rate after warm-up: cosine decay to --final-lr, or constant")
@click.option("--final-lr", metavar="LR", type=_Finite(0), default=_TRAIN.final_lr, show_default=True,
              help="learning rate at the end of the cosine schedule")
@click.option("--batch-size", metavar="N", type=click.IntRange(min=1), default=_TRAIN.batch_size,
              show_default=True, help="samples per training batch")
@click.option("--grad-accum", metavar="N", type=click.IntRange(min=1), default=_TRAIN.grad_accum,
              show_default=True, help="micro-batches of --batch-size per optimizer step (gradient accumulation)")
@click.option("--train-seed", "--seed", "train_seed", metavar="N", type=int, default=_TRAIN.train_seed,
              show_default=True, help="seed of training: shuffling, augmentation, ReDo re-initialisation "
                                      "(not the data split: --split-seed)")
@click.option("--baseline", is_flag=True, help="also run the same fine-tuning without stripping, for a side-by-side")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its last completed epoch")
@click.option("--finalize", is_flag=True,
              help="write the outputs of an interrupted run's completed epochs (from its train-state.pt in --out), "
                   "training no further; pass the interrupted command's options")
@click.option("--compact", is_flag=True, help="also write compact.safetensors with the still-dead neurons removed")
@click.option("--augment", metavar="SPEC", type=str, default=_TRAIN.augment, show_default=True,
              help="training augmentation: default (crop+flip for CIFAR-like images), none, or crop/flip/autoaugment "
                   "joined with +")
@click.option("--test-corrupted", metavar="DATA", default=None,
              help="also evaluate on a corrupted test set at the end, e.g. cifar10-c")
@_device_option
@click.option("--device-map", metavar="MAP", default=None,
              help="not supported by strip (fine-tuning a model dispatched over devices): refused; inspect takes it")
@click.option("--out", metavar="DIR", default=None,
              help="output folder (default: strip/ inside --from, beside the inspect the run starts from)")
@_trust_pickle_option
@_allow_global_option
@_overwrite_option
@_csv_option
@_plotlyjs_option
@click.pass_context
def strip(ctx, checkpoint, arch, from_dir, baseline, resume, finalize, compact, test_corrupted, device, device_map, out,
          trust_pickle, plotlyjs, allow_global, overwrite, csv, epochs, **kw):
    """Revive dead neurons with Synaptic Stripping while fine-tuning.

    After each epoch: scan the validation split, prune the most negative remaining incoming
    weights of every dead neuron (a fraction --rate), log a history row. Writes
    stripped.safetensors (a Hugging Face folder: the folder stripped/) + masks.safetensors,
    summary.json with the history, stats.h5 and report.html to --out. On token data a causal
    language model is fine-tuned on next-token prediction.

    \b
    Examples:
      deadscan strip sample_models/mlp_digits.safetensors --data digits --finetune 5 --warmup 0
      deadscan strip --from deadscan-out --finetune 50
    """
    from . import pipeline
    from .devmap import refuse_strip
    from .options import DataOptions, LoadOptions, OutputOptions

    if device_map is not None:
        refuse_strip(device_map)
    data = _pop_data(kw)
    # --corruption/--severity pick the blocks of --test-corrupted; the training data has none
    corrupted = None if test_corrupted is None else DataOptions(test_corrupted, corruption=data.corruption,
                                                                severity=data.severity)
    data = replace(data, corruption=None, severity=None)
    cfg = TrainConfig(epochs=epochs, **kw)

    header = ["dead: detected after the epoch's training, before its strip step"]

    def on_epoch(row):
        while header:
            _echo(header.pop())
        _echo(f"epoch {row['epoch']:>3}  dead {row['dead']:>5}  revived {row['revived']:>4}  "
              f"pruned {row['pruned_weights']:>7}  %A {row['active_percent']:6.2f}  "
              f"train loss {_fmt(row['train_loss'], 4)}  val acc {_fmt(row['val_acc'])}"
              + (f"  val ppl {_fmt(row['val_perplexity'])}" if "val_perplexity" in row else ""))

    out = out if out is not None else str(Path(from_dir) / DEFAULTS.strip_dir)
    ctx.meta[_STRIP_OUT] = out  # from here an interrupt keeps the completed epochs
    run = pipeline.strip_checkpoint(checkpoint, data, cfg=cfg, load=LoadOptions(arch, trust_pickle, allow_global),
                                    output=OutputOptions(out, overwrite, plotlyjs, csv), from_dir=from_dir,
                                    baseline=baseline, resume=resume, device=device, command=_command_line(),
                                    compact=compact, on_epoch=on_epoch, progress=True, corrupted=corrupted,
                                    finalize=finalize, started=_started())
    if not run.main:  # under torchrun process 0 prints
        return
    s = run.summary
    t, b = s["totals"], s["start"]
    _echo(f"\nstart (the input checkpoint): dead {b['dead']} of {b['neurons']}  %A {_fmt(b['active_percent'])}")
    _echo(f"end (after the last strip step): dead {t['dead']} of {t['neurons']}  %A {_fmt(t['active_percent'])}  "
          f"pruned weights {t['pruned_weights']}  test acc {_fmt(s['test'].get('acc'))}")
    if "test_corrupted" in s:
        _echo(f"corrupted test ({s['test_corrupted']['name']}): acc {_fmt(s['test_corrupted']['acc'])}  "
              f"NLL {_fmt(s['test_corrupted']['loss'])}")
    if "baseline" in s:
        b = s["baseline"]["history"][-1] if s["baseline"]["history"] else {}
        _echo(f"baseline (no stripping) at the end: dead {b.get('dead')}  %A {_fmt(b.get('active_percent'))}  "
              f"test acc {_fmt(s['baseline']['test'].get('acc'))}")
    if "compact" in s:
        c = s["compact"]
        if c.get("nothing_to_compact"):
            _echo("compact: nothing to compact (no neuron with a feeding layer is dead at the end); "
                  "no compact file written")
        else:
            lat = c["cpu_latency_ms"]
            _echo(f"compact: removed {sum(c['removed'].values())} dead neurons, params {c['params_before']} -> "
                  f"{c['params_after']}, max abs output diff {c['max_abs_diff']:.3g}, CPU latency (median, "
                  f"quartiles of {lat['before']['runs']} interleaved runs) {_latency(lat['before'])} -> "
                  f"{_latency(lat['after'])} ms")
    for path in run.files.values():
        _echo(f"wrote {path}")


@main.command()
@click.argument("stats")
@click.option("--out", metavar="DIR", default=None, help="output folder (default: the folder holding STATS)")
@_plotlyjs_option
def report(stats, out, plotlyjs):
    """Re-render report.html from a stats.h5 alone (no model or data needed).

    STATS is a stats.h5 written by inspect or strip, or the run folder holding one.

    \b
    Example:
      deadscan report deadscan-out/stats.h5 --out paper
    """
    if not _main_process():  # under torchrun: one file to write, process 0 writes it
        return
    from .report import rerender

    _echo(f"wrote {rerender(stats, out, plotlyjs=plotlyjs)}")


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--out", metavar="DIR", default=DEFAULTS.out_dir, show_default=True,
              help="output folder (compare.html)")
@_plotlyjs_option
def compare(a, b, out, plotlyjs):
    """Compare two runs side by side: per-site dead and %A deltas (B - A), overlaid histograms.

    A and B are stats.h5 files written by inspect or strip (or their run folders); writes compare.html
    to --out.

    \b
    Example:
      deadscan compare base/stats.h5 stripped/stats.h5 --out compare-out
    """
    if not _main_process():
        return
    from .report import compare as compare_runs

    _echo(f"wrote {compare_runs(a, b, out, plotlyjs=plotlyjs)}")


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _latency(t: dict) -> str:
    return f"{t['median']:.3f} [{t['q1']:.3f}, {t['q3']:.3f}]"


if __name__ == "__main__":  # pragma: no cover
    main()

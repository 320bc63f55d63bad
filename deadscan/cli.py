"""The ``deadscan`` command: parse, call the library, print. Nothing imports this module."""

from __future__ import annotations

import json
import shlex
import sys

import click

from . import __version__, pipeline
from .data import SPLITS, resource_path
from .defaults import DEFAULTS
from .errors import DeadscanError

SAMPLE_MODEL = "mlp_digits.safetensors"


def _command_line() -> str:
    return "deadscan " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _run(fn, *args, **kwargs):
    """Call the library; its errors become one ``Error:`` line and exit 1."""
    try:
        return fn(*args, **kwargs)
    except DeadscanError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; nothing was written") from None


def _print_inspection(result: pipeline.Inspection, as_json: bool) -> None:
    from .report import format_table

    if as_json:
        click.echo(json.dumps(result.summary, indent=2))
        return
    s = result.summary
    ck = s["checkpoint"]
    click.echo(f"checkpoint {ck['path']} ({ck['format']}, arch {ck['arch'] or 'pickled module'})")
    click.echo(f"data {s['data']['name']} split {s['data']['split']}: {s['data']['samples']} samples on {s['device']}")
    click.echo("")
    click.echo(format_table(s))
    click.echo(f"\nwrote {result.summary_path}")


@click.group()
@click.version_option(__version__, prog_name="deadscan")
def main():
    """Find dead ReLU neurons, measure the capacity they waste, and revive them.

    A neuron is dead when its output is exactly zero on every element of the scanned data.
    """


def _scan_options(f):
    options = [
        click.option("--data", "data", required=True, help="digits, cifar10, cifar100, svhn, mnist, fashion-mnist, or a .npz/.h5 file"),
        click.option("--arch", default=None, help="architecture for plain state dicts, e.g. 'mlp(depth=2, width=256)' or torchvision:resnet18"),
        click.option("--split", type=click.Choice(SPLITS), default=DEFAULTS.split, show_default=True, help="data split to scan (val: seeded hold-out of train)"),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="scan only the first N samples of the split"),
        click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size, show_default=True),
        click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)"),
        click.option("--tau", type=click.FloatRange(min=0), default=DEFAULTS.tau, show_default=True, help="ReDo dormancy threshold"),
        click.option("--data-root", default=None, help="folder holding torchvision datasets (default ~/.cache/deadscan/data)"),
        click.option("--download", is_flag=True, help="download a torchvision dataset if missing"),
        click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="seed of the train/val/test split"),
        click.option("--out", default=DEFAULTS.out_dir, show_default=True, help="output folder"),
        click.option("--json", "as_json", is_flag=True, help="print summary.json to stdout instead of the table"),
        click.option("--trust-pickle", is_flag=True, help="allow pickled modules and TorchScript: RUNS CODE from the file"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@_scan_options
def inspect(checkpoint, data, arch, split, limit, batch_size, device, tau, data_root, download, seed, out,
            as_json, trust_pickle):
    """Scan CHECKPOINT on a dataset: dead neurons per ReLU site and %A.

    Prints a per-site table and totals, and writes summary.json to --out.

    Example:

        deadscan inspect sample_models/mlp_digits.safetensors --data digits
    """
    result = _run(pipeline.inspect, checkpoint, data, out=out, arch=arch, trust_pickle=trust_pickle,
                  split=split, limit=limit, batch_size=batch_size, device=device, tau=tau,
                  data_root=data_root, download=download, seed=seed, command=_command_line(),
                  progress=not as_json)
    _print_inspection(result, as_json)


@main.command()
@click.option("--out", default=DEFAULTS.out_dir, show_default=True, help="output folder")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
def demo(out, device):
    """Inspect the bundled sample MLP on the bundled digits data (no download).

    Example:

        deadscan demo --out demo-out
    """
    model = resource_path("sample_models", SAMPLE_MODEL)
    click.echo(f"deadscan demo: the paper's MLP trained on sklearn's digits ({model.name})\n")
    result = _run(pipeline.inspect, model, "digits", out=out, device=device, command=_command_line(), progress=True)
    _print_inspection(result, as_json=False)
    click.echo(f"outputs in {result.summary_path.parent}/")


if __name__ == "__main__":  # pragma: no cover
    main()

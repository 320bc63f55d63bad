"""End-to-end flows the CLI runs: load -> trace -> scan -> capacity -> summary."""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .capacity import Capacity, capacity
from .checkpoint import Checkpoint, load_checkpoint, save_masks, save_safetensors
from .data import Dataset, check_fits, load_data
from .defaults import DEFAULTS
from . import distributed
from .errors import DataError, DeadscanError, DeadscanNote, DeadscanWarning, OutputError, TraceError
from .finetune import STATE_FILE, check_divides, evaluate, finetune, saved_by
from .options import DataOptions, LoadOptions, OutputOptions, TrainConfig
from .outputs import claim_out_dir
from .report import build_summary, start_state, write_outputs, write_summary
from .reportdata import capture_weights, collect
from .runfolder import previous_run
from .runs import write_csv
from .scan import ScanResult, nothing_to_strip, resolve_device, scan
from .trace import find_sites


@dataclass
class Inspection:
    checkpoint: Checkpoint
    dataset: Dataset
    scan: ScanResult
    capacity: Capacity
    summary: dict
    summary_path: Path
    files: dict[str, Path] | None = None  # stats.h5 and report.html
    main: bool = True  # False: another torchrun process writes and prints (nothing was written here)


def inspect(checkpoint: str | Path, data: DataOptions | str, *, split: str = DEFAULTS.split,
            limit: int | None = None, load: LoadOptions = LoadOptions(), output: OutputOptions = OutputOptions(),
            batch_size: int = DEFAULTS.batch_size, device: str | None = None, tau: float = DEFAULTS.tau,
            command: str = "", progress: bool = False, started: float | None = None,
            device_map=None) -> Inspection:
    """Scan ``checkpoint`` on one split of ``data`` (a DataOptions, or just its name) and write the outputs.
    ``started``: the time.perf_counter() the run's clock starts from (the command line's start).
    ``device_map``: a :class:`deadscan.devmap.DeviceMap` placing the model's layers over the GPUs, CPU memory
    and disk (instead of ``device``)."""
    start = time.perf_counter() if started is None else started
    if device_map is not None:
        from . import devmap

        devmap.check_run(device_map, device, distributed.launched().world)
    data = (DataOptions(name=data) if isinstance(data, str) else data).absolute()  # as the record keeps it
    out = Path(output.out or DEFAULTS.out_dir)
    group = distributed.setup(resolve_device(device))
    with contextlib.ExitStack() as stack:
        def prepare():  # only process 0 claims --out and writes; every process loads
            if group.is_main:
                stack.enter_context(claim_out_dir(out, INSPECT_OUTPUTS, overwrite=output.overwrite,
                                                  inputs=(checkpoint, data.name)))  # before any work
            dev = distributed.scan_device(resolve_device(device))
            ckpt = load_checkpoint(checkpoint, load.arch, trust_pickle=load.trust_pickle,
                                   allow_globals=load.allow_globals)
            ds = load_data(data.name, split, limit=limit, model_folder=_hf_folder(checkpoint), **data.load_kwargs())
            placed = None
            if device_map is None:
                model = for_device(ckpt.model, dev)
            else:  # restored (hooks removed, weights back on the CPU) after the scan, or on any error
                placed = stack.enter_context(devmap.dispatch(ckpt.model, device_map, _hf_folder(checkpoint)))
                model, dev = ckpt.model, placed.input_device
            check_fits(model, ds, dev)
            sitemap = find_sites(model) if placed is None else placed.sitemap  # found before dispatch
            return dev, ckpt, ds, model, sitemap, placed

        dev, ckpt, ds, model, sitemap, placed = _in_turn(group, data.download, prepare)
        result = scan(model, ds, sitemap=sitemap, batch_size=batch_size, device=dev, tau=tau,
                      progress=progress and group.is_main, input_means=True)
        if placed is not None:
            placed.restore()
        cap = capacity(model, result)
        data_info = {**ds.describe(), "root": data.root}
        if result.tokens is not None:
            data_info["tokens"] = result.tokens  # real tokens scanned: padded positions never count
        summary = build_summary(result, cap, command=command, checkpoint=_recorded(ckpt.info), data=data_info,
                                elapsed=time.perf_counter() - start)
        summary["scan_dtype"] = _dtype_name(model)
        if placed is not None:
            summary["device_map"] = placed.device_map
        if not group.is_main:
            return Inspection(ckpt, ds, result, cap, summary, Path(out) / "summary.json", main=False)
        if result.tokens is not None:  # a language model: which tokens fire its rarest live neurons
            from .rare_tokens import rare_tokens

            summary["rare_tokens"] = rare_tokens(model, result, ds, batch_size=batch_size, device=dev,
                                                 tokenizer=_tokenizer(data.tokenizer or _hf_folder(checkpoint)))
        path = write_summary(summary, out)
        report_data = collect(summary, result, model)
        files = write_outputs(report_data, out, plotlyjs=output.plotlyjs)  # stats.h5, report.html
        if output.csv:  # sites.csv, neurons.csv
            files.update(write_csv(report_data, out))
        return Inspection(ckpt, ds, result, cap, summary, path, files)


def _in_turn(group: distributed.Group, download: bool, prepare):
    """``prepare()`` in every process, then all agree before any goes on: an error in one stops them all (one
    line, from process 0). ``download`` under torchrun: process 0 prepares first and fetches the files, the
    others then read them (no two processes write one dataset folder at once)."""
    staged = download and group.active
    if staged and not group.is_main:
        group.check()  # until process 0 has loaded
    error = value = None
    try:
        value = prepare()
    except DeadscanError as e:
        error = e
    if staged and group.is_main:
        group.check(error)  # the others start loading
    group.check(error)
    return value


def for_device(model, dev):
    """The model on ``dev``: bf16/fp16 weights stay so on a GPU (statistics still accumulate in fp32/fp64)
    and become float32 on the CPU, where half-precision matmuls are slow and round differently."""
    halves = {torch.float16, torch.bfloat16}
    if dev.type == "cpu" and any(p.dtype in halves for p in model.parameters()):
        model = model.float()
    return model.to(dev)


def _dtype_name(model) -> str:
    """The dtype the model computed in (its first floating-point parameter's), e.g. "float32"."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return "float32" if p is None else str(p.dtype).removeprefix("torch.")


def _tokenizer(folder: str | None):
    """The tokenizer saved in ``folder`` (the model folder, or --tokenizer), or None: tokens show as ids."""
    if folder is None:
        return None
    from .data.tokens import load_tokenizer

    try:
        return load_tokenizer(folder)
    except DataError:  # a folder without a tokenizer: ids are still the answer
        return None


def _recorded(info):
    """The checkpoint as outputs record it: an absolute path, so a later ``strip --from`` finds it again
    from any directory (and checks it by sha256)."""
    return replace(info, path=os.path.abspath(info.path))


def _hf_folder(checkpoint) -> str | None:
    """The checkpoint if it is a Hugging Face model folder (its tokenizer tokenises text data), else None."""
    from .hf import is_folder

    return str(checkpoint) if is_folder(checkpoint) else None


# What each command writes to --out: an existing one is refused unless --overwrite (strip --resume reuses its own).
INSPECT_OUTPUTS = ("summary.json", "stats.h5", "report.html", "sites.csv", "neurons.csv")  # the csv: --csv
STRIP_OUTPUTS = INSPECT_OUTPUTS + ("stripped.safetensors", "stripped", "masks.safetensors", "compact.safetensors",
                                   "compact", STATE_FILE)  # stripped/, compact/: a language model's folders


@dataclass
class StripRun:
    summary: dict
    out: Path
    files: dict[str, Path]
    model: object = None  # the stripped model, in memory (on the training device)
    main: bool = True  # False: another torchrun process wrote and prints (summary and files empty here)


def strip_checkpoint(checkpoint: str | Path | None, data: DataOptions | str | None, *, cfg: TrainConfig,
                     load: LoadOptions = LoadOptions(), output: OutputOptions = OutputOptions(),
                     from_dir: str | Path = DEFAULTS.out_dir, baseline: bool = False, resume: bool = False,
                     device: str | None = None, command: str = "", compact: bool = False, on_epoch=None,
                     progress: bool = False, corrupted: DataOptions | None = None,
                     finalize: bool = False, started: float | None = None) -> StripRun:
    """Fine-tune with stripping and write the outputs. ``checkpoint`` None: the one the run in ``from_dir``
    scanned, with its data options under the ones ``data`` gives. ``corrupted``: a test set (e.g. cifar10-c)
    also evaluated at the end. ``finalize``: write the outputs of an interrupted run's completed epochs (its
    train-state.pt in ``output.out``) without training further. ``started``: as for :func:`inspect`.

    Under torchrun: DistributedDataParallel over the processes (README "Running at scale"); only process 0
    claims ``output.out``, writes and returns the summary (``StripRun.main`` False in the others)."""
    start = time.perf_counter() if started is None else started
    if finalize and baseline:
        raise DataError("--finalize writes the outputs of the stripped run's completed epochs; the baseline is "
                        f"not kept in {STATE_FILE}: drop --baseline")
    check_divides(cfg, distributed.launched().world)  # every process alike, before the group starts
    resume = resume or finalize
    group = distributed.setup(resolve_device(device))
    resume = resume or _restarted_with_own_state(_strip_out(output, from_dir), group)
    with contextlib.ExitStack() as stack:
        # only process 0 claims --out and writes; every process loads, then all agree before training
        download = isinstance(data, DataOptions) and bool(data.download)  # the corrupted set inherits it
        prepared = _in_turn(group, download, lambda: _prepare_strip(
            checkpoint, data, cfg, load, output, from_dir, resume, device, corrupted, group, stack))
        return _run_strip(prepared, baseline=baseline, resume=resume, command=command, compact=compact,
                          on_epoch=on_epoch if group.is_main else None, progress=progress and group.is_main,
                          finalize=finalize, output=output, start=start, group=group)


def _strip_out(output: OutputOptions, from_dir) -> Path:
    return Path(output.out) if output.out is not None else Path(from_dir) / DEFAULTS.strip_dir


def _restarted_with_own_state(out: Path, group: distributed.Group) -> bool:
    """After torchrun restarted the processes (``--max-restarts``), a state this launch saved in ``out`` is
    continued as with --resume; another run's state is left to the command line. Process 0 decides for all."""
    if not distributed.restarts():
        return False
    epoch = saved_by(out / STATE_FILE, distributed.launch_token()) if group.is_main else None
    epoch = group.gather_ints(-1 if epoch is None else epoch)[0]
    if epoch < 0:
        return False
    if group.is_main:
        warnings.warn(DeadscanNote(f"torchrun restarted the processes (restart {distributed.restarts()}): continuing "
                                   f"from epoch {epoch}, saved in {out / STATE_FILE} by this launch"), stacklevel=3)
    return True


@dataclass
class _Prepared:
    """What strip loaded and resolved before training (the same in every torchrun process)."""

    ckpt: Checkpoint
    splits: dict
    shifted: Dataset | None
    cfg: TrainConfig
    model: object
    sitemap: object
    dev: object
    out: Path
    data: DataOptions
    hf_folder: str | None


def _prepare_strip(checkpoint, data, cfg, load, output, from_dir, resume, device, corrupted, group,
                   stack) -> _Prepared:
    data = DataOptions(name=data) if isinstance(data, str) else (data or DataOptions())
    reusing = checkpoint is None  # the documented flow: strip the checkpoint an inspect scanned
    arch, arch_source, expected_sha = load.arch, None, None
    if reusing:
        last = previous_run(from_dir)
        checkpoint, expected_sha = last.checkpoint, last.sha256
        if arch is None and last.arch is not None:  # a spec that names no code (checked when read)
            arch, arch_source = last.arch, str(last.summary_path)
        data = data.over(last.data)  # what the user passes wins; the split seed and the rest carry over
    if data.name is None:
        raise DataError("--data is required with a checkpoint")
    data = data.absolute()
    if reusing and not Path(checkpoint).exists():
        raise DataError(f"{checkpoint}: the checkpoint {last.summary_path} records is not there; pass CKPT "
                        "(and --data) yourself")
    hf_folder = _hf_folder(checkpoint)
    out = _strip_out(output, from_dir)
    if not (resume or output.overwrite) and (out / STATE_FILE).exists():
        raise OutputError(f"--out {out} holds {STATE_FILE} from an earlier strip run; pass --resume to continue it, "
                          "--overwrite to start over, or choose another --out")
    own_inspect = reusing and out.resolve() == Path(from_dir).resolve() and not last.is_strip
    if group.is_main:
        stack.enter_context(claim_out_dir(out, STRIP_OUTPUTS, overwrite=output.overwrite or resume,
                                          inputs=(checkpoint, data.name),
                                          replaceable=INSPECT_OUTPUTS if own_inspect else ()))
    dev = distributed.scan_device(resolve_device(device))
    ckpt = load_checkpoint(checkpoint, arch, trust_pickle=load.trust_pickle, allow_globals=load.allow_globals,
                           arch_source=arch_source)
    if expected_sha is not None and ckpt.info.sha256 != expected_sha:
        raise DataError(f"{checkpoint}: changed since the run in {from_dir} scanned it (sha256 differs); "
                        "pass the checkpoint and --data yourself")
    splits = {s: load_data(data.name, s, model_folder=hf_folder, **data.load_kwargs())
              for s in ("train", "val", "test")}
    shifted = None
    if corrupted is not None:  # the training data's normalisation, its own corruption blocks
        shifted_options = replace(corrupted.over(data), name=corrupted.name, val_fraction=None)
        shifted = load_data(corrupted.name, "test", **shifted_options.load_kwargs())
    cfg = replace(cfg, task=_task(ckpt.model, splits["val"], data, checkpoint))
    if cfg.task == "causal_lm":  # logits are (batch, tokens, vocab): evaluate and scan in training-sized batches
        cfg = replace(cfg, eval_batch_size=min(cfg.eval_batch_size, cfg.batch_size))
    if shifted is not None and cfg.task != "classification":
        raise DataError(f"--test-corrupted {corrupted}: corrupted test sets are images; a language model has none")
    model = ckpt.model.to(dev)
    check_fits(model, splits["val"], dev)
    sitemap = find_sites(model)
    nothing = nothing_to_strip(sitemap, checkpoint)
    if nothing:
        raise TraceError(nothing)
    for line in cfg.warnings():  # once the inputs are known good: a failing run prints only its Error
        warnings.warn(line, DeadscanWarning, stacklevel=3)
    return _Prepared(ckpt, splits, shifted, cfg, model, sitemap, dev, out, data, hf_folder)


def _run_strip(p: _Prepared, *, baseline, resume, command, compact, on_epoch, progress, finalize, output, start,
               group) -> StripRun:
    """Train and write. Every process runs the collectives (training, scans, evaluations); process 0 alone
    writes and returns the summary (the others return after the last collective)."""
    ckpt, splits, shifted, cfg, model, dev, out = p.ckpt, p.splits, p.shifted, p.cfg, p.model, p.dev, p.out
    base_hist = base_test = None
    if baseline:
        base_model = copy.deepcopy(model)  # still untrained: the stripped run starts below
        base = finetune(base_model, splits["train"], splits["val"], replace(cfg, strip=False), device=dev,
                        test=splits["test"])
        base_hist, base_test = base.history, base.test
        if shifted is not None:
            base_test = {**base_test, "corrupted": evaluate(base_model, shifted, dev, cfg.eval_batch_size)}
        del base_model

    before = capture_weights(model, p.sitemap)  # for the revived neurons' weight histograms
    first = scan(model, splits["val"], sitemap=p.sitemap, batch_size=cfg.eval_batch_size, device=dev)
    begin = start_state(first, capacity(model, first))  # the input checkpoint, before any training
    del first
    res = finetune(model, splits["train"], splits["val"], cfg, device=dev, test=splits["test"],
                   state_path=out / STATE_FILE, resume=resume, on_epoch=on_epoch, source=ckpt.info.sha256,
                   progress=progress, finalize=finalize)
    splits["train"].release()  # its device copy is not needed after training
    stripper = res.stripper
    final = scan(model, splits["val"], sitemap=stripper.sitemap, batch_size=cfg.eval_batch_size, device=dev,
                 input_means=True)
    shifted_result = None if shifted is None else evaluate(model, shifted, dev, cfg.eval_batch_size)
    if not group.is_main:
        return StripRun({}, out, {}, model, main=False)
    cap = capacity(model, final, stripper.masks.masks)
    if p.hf_folder is not None:  # a Hugging Face folder again: config, weights under their own names, tokenizer
        from .hf import save_folder

        files = {"stripped": out / "stripped", "masks": out / "masks.safetensors"}
        save_folder(model, files["stripped"], source=p.hf_folder)
    else:
        files = {"stripped": out / "stripped.safetensors", "masks": out / "masks.safetensors"}
        save_safetensors(model, files["stripped"], ckpt.info.arch or "",
                         {"deadscan_source_sha256": ckpt.info.sha256})
    save_masks(stripper.masks.state_dict(), files["masks"])
    if compact:
        summary_compact = _compact(model, final, splits["val"], cfg, out, ckpt.info.arch or "", p.hf_folder)
        if "path" in summary_compact:
            files["compact"] = Path(summary_compact["path"])
    data_info = {**splits["val"].describe(), "root": p.data.root}
    summary = build_summary(final, cap, command=command, checkpoint=_recorded(ckpt.info), data=data_info,
                            elapsed=time.perf_counter() - start)
    summary["start"] = begin
    if cfg.warnings():
        summary["warnings"] = cfg.warnings()  # the report's banner
    summary["config"] = asdict(cfg)  # task and grad_accum included
    summary["history"] = res.history
    if finalize:  # an interrupted run's outputs: say how far it got
        summary["finalized"] = {"epochs_done": len(res.history), "epochs_planned": cfg.epochs}
    summary["test"] = res.test
    if shifted is not None:
        summary["test_corrupted"] = {**shifted_result, **shifted.describe()}
    if baseline:
        summary["baseline"] = {"history": base_hist, "test": base_test}
    if compact:
        summary["compact"] = summary_compact
    summary["outputs"] = {k: str(v) for k, v in files.items()}
    files["summary"] = write_summary(summary, out)
    report_data = collect(summary, final, model, masks=stripper.masks.masks, before=before)
    del before
    files.update(write_outputs(report_data, out, plotlyjs=output.plotlyjs))  # stats.h5, report.html
    if output.csv:  # sites.csv, neurons.csv
        files.update(write_csv(report_data, out))
    return StripRun(summary, out, files, model)


def _task(model, val, data, checkpoint) -> str:
    """classification for image data; causal_lm for token data on a Hugging Face causal language model
    (the only language models fine-tuned yet)."""
    if getattr(val, "kind", None) != "tokens":
        return "classification"
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) or not _is_causal_lm(name):
        what = "a sequence-to-sequence model" if getattr(config, "is_encoder_decoder", False) else "not a causal LM"
        raise DataError(f"{checkpoint}: {name} is {what}; fine-tuning on token data is supported for causal "
                        "language models (...ForCausalLM) only, not yet for encoder-only or sequence-to-sequence "
                        "models; deadscan inspect scans them")
    return "causal_lm"


def _is_causal_lm(name: str) -> bool:
    if name.endswith("ForCausalLM"):
        return True
    try:  # transformers' own list of causal LM heads (GPT-2's is GPT2LMHeadModel)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names
    except ImportError:
        return False
    return name.endswith("LMHeadModel") and name in set(names.values())


def _compact(model, final: ScanResult, val: Dataset, cfg: TrainConfig, out: Path, arch: str,
             hf_folder: str | None = None) -> dict:
    """Remove still-dead neurons; write compact.safetensors (a Hugging Face folder: the folder compact/) only if
    outputs match on the scanned data (a language model: logits at real positions of the val token batches)."""
    from .compact import compact, compare_outputs, cpu_latencies_ms

    dev = next(model.parameters()).device
    c = compact(model, final)
    if not sum(c.removed.values()):  # the same model again: no file, no latency "speed-up" from noise
        return {"removed": {}, "skipped": c.skipped, "params_before": c.params_before,
                "params_after": c.params_after, "nothing_to_compact": True}
    diff, scale = compare_outputs(model, c.model, val.batches(cfg.eval_batch_size, dev))
    tolerance = 1e-4 * max(1.0, scale)
    target = "compact/" if hf_folder is not None else "compact.safetensors"
    if diff > tolerance:
        raise OutputError(f"compacted model's outputs differ by {diff:.3g} (> {tolerance:.3g}) on the scanned "
                          f"data; {target} not written")
    extra = {}
    if hf_folder is not None:
        # config.json unchanged (one FFN width for all layers): the per-layer widths are in model.safetensors'
        # deadscan_shapes metadata, which deadscan.load reads; transformers' from_pretrained cannot load it
        from .hf import save_folder

        path = save_folder(c.model, out / "compact", source=hf_folder, metadata=c.metadata())
        example = val.example(1)  # one sequence: an LM's CPU forward on a full batch is slow
        extra["loads"] = "loads with deadscan.load(folder); not with transformers' from_pretrained (narrower layers)"
    else:
        path = out / "compact.safetensors"
        save_safetensors(c.model, path, arch, c.metadata())
        example = val.prepare(val.x[: min(len(val), 64)])
    batch = len(example["input_ids"]) if isinstance(example, dict) else len(example)
    before, after = cpu_latencies_ms([model, c.model], example)
    return {"path": str(path), **extra, "removed": c.removed, "skipped": c.skipped,
            "params_before": c.params_before, "params_after": c.params_after, "max_abs_diff": diff,
            "tolerance": tolerance, "cpu_latency_ms_before": before["median"], "cpu_latency_ms_after": after["median"],
            "cpu_latency_ms": {"before": before, "after": after}, "latency_batch": batch}

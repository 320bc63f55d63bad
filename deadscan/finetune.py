"""Fine-tuning with per-epoch detection and stripping: history, checkpoints, resume.

One straight loop; its helpers sit just above it. Each epoch: train, scan the validation split,
strip, evaluate, log a history row, save a resumable checkpoint atomically.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from torch import nn

from . import distributed
from .checkpoint import load_torch_file
from .outputs import atomic_path
from .data import Dataset
from .errors import DataError, DeadscanError, one_line
from .runfolder import ANY, COUNT, HISTORY_ROW, STR, MapOf, Opt, check
from .options import TrainConfig
from .strip import StepReport, Stripper

STATE_FILE = "train-state.pt"


class Interrupted(DeadscanError):
    """Ctrl-C / SIGTERM: the last completed epoch is saved."""


@dataclass
class FinetuneResult:
    history: list[dict] = field(default_factory=list)
    stripper: Stripper | None = None
    test: dict = field(default_factory=dict)  # loss, acc on the test split


def _lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    epoch = step / steps_per_epoch
    if epoch < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup * steps_per_epoch)
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.epochs - cfg.warmup, 1)
    progress = min((epoch - cfg.warmup) / span, 1.0)
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * progress))


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


class Task:
    """What training minimises and evaluation reports. ``loss(model, batch)``: the mean loss of one training
    batch (a scalar tensor); ``weight(batch)``: how many terms that mean is over (samples, or predicted
    tokens), known without a forward, so accumulated micro-batches weigh as one big batch. ``evaluate``:
    {"loss", "acc"} over a split (mean NLL per term, accuracy in %), one host sync at the end."""

    name = ""
    autocast = False  # bf16 autocast on CUDA when True (language models); image training stays float32

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, batch) -> torch.Tensor | int:
        raise NotImplementedError

    def sums(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed NLL, correct predictions, predictions) of one evaluation batch, as tensors (no host sync)."""
        raise NotImplementedError

    def eval_batches(self, ds, batch_size: int, device: torch.device):
        return ds.batches(batch_size, device)

    def evaluate(self, model: nn.Module, ds, device: torch.device, batch_size: int, amp=None,
                 group: distributed.Group = distributed.Group()) -> dict:
        """Mean NLL per prediction and accuracy (%) over a split; one host sync at the end. Of several
        processes' ``group``: each evaluates its share and the sums are reduced (every process returns the
        one-process figures)."""
        if ds is None or len(ds) == 0:  # the whole split's length: every process returns here alike
            return {"loss": None, "acc": None}
        if group.active:
            from .scan import shard_dataset

            ds = shard_dataset(ds, group)
        model.eval()
        loss = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.long)
        count = torch.zeros((), device=device, dtype=torch.long)
        with torch.inference_mode(), (amp or contextlib.nullcontext()):
            for batch in self.eval_batches(ds, batch_size, device):
                nll, ok, n = self.sums(model, batch)
                loss += nll.double()
                correct += ok
                count += n
        if group.active:  # float64 holds the counts exactly (below 2**53)
            sums = group.all_reduce(torch.stack([loss, correct.double(), count.double()]).to(group.device), "sum")
            loss, correct, count = sums[0], sums[1], sums[2]
        n = int(count)  # sync point
        if n == 0:  # e.g. one-token sequences: nothing to predict
            return {"loss": None, "acc": None}
        return self._result(float(loss) / n, 100.0 * float(correct) / n)

    def _result(self, mean_nll: float, acc: float) -> dict:
        return {"loss": mean_nll, "acc": acc}


class Classification(Task):
    """Cross-entropy on integer labels; batches are ``(x, y)``."""

    name = "classification"

    def loss(self, model, batch):
        xb, yb = batch
        return F.cross_entropy(model(xb), yb)

    def weight(self, batch):
        return len(batch[1])

    def eval_batches(self, ds, batch_size, device):
        y_all = ds.y.to(device)
        for i, xb in enumerate(ds.batches(batch_size, device)):
            yield xb, y_all[i * batch_size:(i + 1) * batch_size]

    def sums(self, model, batch):
        xb, yb = batch
        out = model(xb)
        return F.cross_entropy(out.float(), yb, reduction="sum"), (out.argmax(1) == yb).sum(), yb.new_tensor(len(yb))


class CausalLM(Task):
    """Next-token prediction on token batches (``{"input_ids", "attention_mask"}``): position t predicts token
    t + 1, counted only when both are real (attention_mask 1), so padding never enters the loss, as input or
    as target. ``evaluate`` adds the perplexity, exp(mean NLL per predicted token)."""

    name = "causal_lm"
    autocast = True

    @staticmethod
    def _sums(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed NLL, correct predictions, predicted tokens) of one batch, as tensors (no host sync)."""
        from .data.tokens import model_kwargs

        logits = _logits(model(**model_kwargs(model, batch)))[:, :-1]
        labels = batch["input_ids"][:, 1:]
        real = CausalLM._real(batch)
        labels = labels.masked_fill(~real, -100)  # ignored by cross_entropy
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
        correct = ((logits.argmax(-1) == labels) & real).sum()
        return nll, correct, real.sum()

    @staticmethod
    def _real(batch) -> torch.Tensor:
        """Which next-token predictions count: input position and target both real."""
        mask = batch.get("attention_mask")
        if mask is None:
            return torch.ones_like(batch["input_ids"][:, 1:], dtype=torch.bool)
        return (mask[:, :-1] > 0) & (mask[:, 1:] > 0)

    def loss(self, model, batch):
        nll, _, count = self._sums(model, batch)
        return nll / count.clamp(min=1)

    def weight(self, batch):
        return self._real(batch).sum()

    def sums(self, model, batch):
        return self._sums(model, batch)

    def _result(self, mean_nll, acc):
        return {"loss": mean_nll, "acc": acc, "perplexity": math.exp(mean_nll) if mean_nll < 700 else math.inf}


def _logits(out) -> torch.Tensor:
    """The logits of a model's output (a Hugging Face ModelOutput, a tuple, or a tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out[0]


TASKS = {t.name: t for t in (Classification(), CausalLM())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DeadscanError(f"unknown task {name!r}; one of {', '.join(TASKS)}")
    return TASKS[name]


def autocast_dtype(device: torch.device, task: Task) -> torch.dtype | None:
    """bf16 on CUDA (where supported) for tasks that take it; None (the model's own dtype, float32 for a
    float32 model) on CPU and for image classifiers, whose training stays as it was."""
    if task.autocast and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, task: Task):
    """The autocast context of a run, resolved once from the device and the task."""
    dtype = autocast_dtype(device, task)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def evaluate(model: nn.Module, ds: Dataset | None, device: torch.device, batch_size: int,
             task: Task | None = None, group: distributed.Group | None = None) -> dict:
    """Mean NLL and accuracy (%) over a split; one host sync at the end. ``task`` defaults to next-token
    prediction for token data, classification otherwise. ``group``: default deadscan's torchrun group."""
    if task is None:
        task = TASKS["causal_lm" if getattr(ds, "kind", None) == "tokens" else "classification"]
    return task.evaluate(model, ds, device, batch_size, autocast_context(torch.device(device), task),
                         distributed.current() if group is None else group)


def accumulate(model: nn.Module, task: Task, group: list, amp=None,
               processes: distributed.Group = distributed.Group()) -> tuple[torch.Tensor, torch.Tensor | int]:
    """Backward through the micro-batches of one optimizer step, one at a time, each mean loss weighted by
    its share of the step's terms, so the gradient is that of one batch holding them all. Returns (summed
    loss, terms) for the epoch's mean, as tensors: no host sync. Under DistributedDataParallel (``model``
    wrapped, ``processes`` its group) the share is of the terms of every process's micro-batches, times the
    world size, since DDP averages the processes' gradients: one all-reduce of the step's terms."""
    amp = amp or contextlib.nullcontext()
    weights = [task.weight(batch) for batch in group]
    total = sum(weights)
    ddp = processes.active and isinstance(model, nn.parallel.DistributedDataParallel)
    if ddp:
        every = processes.all_reduce(torch.as_tensor(total, dtype=torch.float64).reshape(1).to(processes.device),
                                     "sum")
        share = every.to(next(model.parameters()).device).clamp(min=1) / processes.world
    else:
        share = total.clamp(min=1) if isinstance(total, torch.Tensor) else max(total, 1)
    summed = 0
    for i, (batch, weight) in enumerate(zip(group, weights)):
        # DDP: only the step's last backward all-reduces the gradients
        sync = model.no_sync() if ddp and i < len(group) - 1 else contextlib.nullcontext()
        with sync:
            with amp:
                loss = task.loss(model, batch)
            # one micro-batch in one process: the plain step, unchanged (its share is 1)
            if len(group) == 1 and not ddp:
                scaled = loss
            else:
                factor = weight / share
                scaled = loss * (factor.reshape(()) if torch.is_tensor(factor) else factor)
            scaled.backward()  # hooks zero pruned weights' grads
        # an empty share (a last batch smaller than the world) has a NaN mean over no terms
        summed = summed + torch.nan_to_num(loss.detach().double()) * weight
    return summed, total


def _leaves_parameters_out(model: nn.Module, task: Task, train: Dataset, device: torch.device) -> bool:
    """Does the loss of a forward leave a trainable parameter out of its graph (a spare head)? Then DDP must
    look for such parameters every step (``find_unused_parameters``: a walk of the graph per step, and a
    warning from torch when there are none, so only then). One forward on two training samples, in eval mode
    with the random state restored: training draws exactly what it would have; the same answer everywhere."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            loss = task.sums(model, next(iter(task.eval_batches(train, 2, device))))[0]  # summed, as evaluated
    finally:
        model.train(was_training)
    reached, seen, todo = set(), set(), [loss.grad_fn]
    while todo:  # the loss's autograd graph, down to the parameters' AccumulateGrad nodes
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            reached.add(id(fn.variable))
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return bool(trainable - reached)


def _history_row(epoch: int, report: StepReport, train_loss, val: dict) -> dict:
    """One epoch: what the scan after its training detected (``dead``, before that epoch's strip step), what
    the strip step then did, and the validation figures after it. The end state is the run's own scan."""
    return {
        "epoch": epoch, "dead": report.dead, "revived": report.revived_count, "died": report.died_count,
        "pruned_weights": report.pruned_weights, "pruned_this_epoch": report.stripped.total if report.stripped else 0,
        "active_percent": round(report.active_percent, 4),
        "active_percent_feeding_weights": round(report.active_percent_feeding_weights, 4),
        "train_loss": train_loss, "val_loss": val["loss"], "val_acc": val["acc"], "test_acc": None,
        "revived_neurons": report.revived, "died_neurons": report.died,
        # dead neurons with no negative incoming weight left: only their bias holds them down
        "held_by_bias": report.stripped.without_negative if report.stripped else 0,
        **({"val_perplexity": val["perplexity"]} if "perplexity" in val else {}),  # language models
        # per site, for the site x epoch view; like "dead", detected before this epoch's strip step
        "dead_by_site": {r.site.name: int(r.dead.sum()) for r in report.scan.sites},
    }


def _save_state(path: Path, model, opt, stripper, history, gen, cfg, epoch, source) -> None:
    state = {
        "epoch": epoch, "config": asdict(cfg), "source": source, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "stripper": stripper.state_dict(), "history": history, "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "launch": distributed.launch_token(),  # a torchrun restart resumes the state of its own launch
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _check_resumable(state: dict, cfg: TrainConfig, source: str, path: Path) -> None:
    saved = state.get("config", {})
    # The schedule depends on the epoch count too: a different --finetune is a different run.
    ignore = {"epochs"} if cfg.schedule == "constant" else set()  # a constant lr run may be extended
    changed = sorted(k for k, v in asdict(cfg).items() if k in saved and saved[k] != v and k not in ignore)
    if changed:
        was = ", ".join(f"{k}={saved[k]!r}" for k in changed)
        raise DeadscanError(f"{path}: cannot resume: the saved run used {was}; rerun with those settings, "
                            "or drop --resume / choose another --out")
    if source and state.get("source") and state["source"] != source:
        raise DeadscanError(f"{path}: cannot resume: it was saved from another checkpoint; "
                            "drop --resume or choose another --out")


@contextlib.contextmanager
def _sigterm_as_interrupt(signalled: list):
    """SIGTERM stops training like Ctrl-C: the last completed epoch is saved (main thread only). Either
    signal is recorded in ``signalled``: under torchrun a process waiting in a collective when its peers stop
    sees their closed connection first (a RuntimeError), which is then the same interrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signalled.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, was in previous.items():
            signal.signal(sig, was)


# What train-state.pt holds (checked before any of it is used: the file is data, like a checkpoint).
STATE_SCHEMA = {"epoch": COUNT, "config": MapOf(ANY), "source": STR, "model": MapOf(ANY), "optimizer": MapOf(ANY),
                "stripper": {"epoch": COUNT, "masks": MapOf(ANY), "previous": MapOf(ANY)}, "history": [HISTORY_ROW],
                "generator": ANY, "torch_rng": ANY, "launch?": Opt(STR)}


def load_state(path: Path, cfg: TrainConfig | None = None) -> dict:
    """A resumable state saved by :func:`finetune`: torch.load(weights_only=True) after the size checks a
    checkpoint gets, then every field checked (types, epoch within the run, one history row per epoch)."""
    state = load_torch_file(path, what="resumable state")
    check(state, STATE_SCHEMA, str(path), "a deadscan train-state.pt")
    epochs = cfg.epochs if cfg is not None else state["epoch"]
    if state["epoch"] > epochs or len(state["history"]) != state["epoch"] \
            or [row["epoch"] for row in state["history"]] != list(range(1, state["epoch"] + 1)):
        raise DataError(f"{path}: not a deadscan train-state.pt (epoch {state['epoch']} with "
                        f"{len(state['history'])} history rows, in a run of {epochs} epochs)")
    tensors = [state["generator"], state["torch_rng"], *state["model"].values(), *state["stripper"]["masks"].values(),
               *state["stripper"]["previous"].values()]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise DataError(f"{path}: not a deadscan train-state.pt (its model, masks or random states are not tensors)")
    return state


def saved_by(path: Path, token: str | None) -> int | None:
    """The epoch of the state at ``path`` if the torchrun launch ``token`` saved it, else None (no file, another
    launch's, or not readable: the command line then decides as usual)."""
    if token is None or not path.exists():
        return None
    try:  # mapped: the weights and optimizer state are not read here (resuming reads and checks them all)
        state = load_torch_file(path, what="resumable state", mmap=True)
    except (DeadscanError, OSError):
        return None
    if not isinstance(state, dict) or state.get("launch") != token:
        return None
    epoch = state.get("epoch")
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1 else None


def check_divides(cfg: TrainConfig, world: int) -> None:
    """The global batch (--batch-size) splits evenly over the processes: each trains on batch-size / world."""
    if world > 1 and cfg.batch_size % world:
        raise DataError(f"--batch-size {cfg.batch_size} does not divide over {world} torchrun processes: pass a "
                        f"multiple of {world} (the global batch; each process trains on --batch-size / {world})")


def finetune(model: nn.Module, train: Dataset, val: Dataset, cfg: TrainConfig, *, device: torch.device,
             test: Dataset | None = None, state_path: Path | None = None, resume: bool = False,
             on_epoch=None, source: str = "", progress: bool = False, finalize: bool = False,
             group: distributed.Group | None = None) -> FinetuneResult:
    """Train ``cfg.epochs`` epochs with detection (+ stripping) after each. ``epochs=0``: one strip
    step and a re-scan, no training. ``on_epoch(row)`` is called after each history row; ``progress``
    shows a bar per epoch on stderr.
    ``source`` (e.g. the input checkpoint's sha256) is saved with the state; ``resume`` refuses a
    state saved from another source or with another configuration. ``finalize``: resume, train no further,
    and return the completed epochs (an interrupted run's outputs).

    ``group`` (default: deadscan's torchrun group): DistributedDataParallel over its processes. Every process
    draws the same shuffled order and augmentation of each global batch of ``cfg.batch_size`` and trains on
    its share (``batch_size / world`` samples), so the steps are the one-process run's; scans and
    evaluations are reduced; only process 0 saves ``state_path`` (every process reads it on resume)."""
    group = distributed.current() if group is None else group
    check_divides(cfg, group.world if group.active else 1)
    torch.manual_seed(cfg.train_seed)
    task = get_task(cfg.task)
    if cfg.grad_accum < 1:
        raise DeadscanError(f"--grad-accum {cfg.grad_accum} must be at least 1")
    amp = autocast_context(torch.device(device), task)  # resolved once: bf16 on CUDA for language models
    model.to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.train_seed)
    opt = _optimizer(cfg, model)
    stripper = Stripper(model, opt, rate=cfg.rate, criterion=cfg.criterion, every=cfg.every,
                        batch_size=cfg.eval_batch_size, device=device, enabled=cfg.strip, method=cfg.method,
                        seed=cfg.train_seed, rule=cfg.prune_rule, group=group)
    result = FinetuneResult(stripper=stripper)
    start = 0
    if finalize and (state_path is None or not state_path.exists()):
        raise DeadscanError(f"--finalize: no {STATE_FILE} in --out {state_path.parent if state_path else ''}: "
                            "nothing to finalize (pass the --out of the interrupted run)")
    if (resume or finalize) and state_path is not None and state_path.exists():
        try:
            try:
                state = load_state(state_path, cfg)
            except DeadscanError as e:
                raise DeadscanError(f"cannot resume: {e}; drop --resume or choose another --out") from None
            _check_resumable(state, cfg, source, state_path)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            stripper.load_state_dict(state["stripper"])
            result.history = list(state["history"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            start = int(state["epoch"])
        except DeadscanError:
            raise
        except Exception as e:  # another model's state, or a damaged file: one line, not a traceback
            raise DeadscanError(f"{state_path}: cannot resume: the saved state does not fit this run "
                                f"({type(e).__name__}: {one_line(e, 200)}); drop --resume or choose another --out") from None

    def assess(ds):
        return task.evaluate(model, ds, device, cfg.eval_batch_size, amp, group)

    if cfg.epochs == 0:  # one strip step, then a re-scan to see what it did
        stripper.every = 1  # the one step strips whatever --every says (epoch 1 % every may be non-zero)
        report = stripper.step(val)
        result.history.append(_history_row(0, report, None, assess(val)))
        stripper.enabled = False
        after = stripper.step(val)
        stripper.enabled, stripper.every = cfg.strip, cfg.every
        result.history.append(_history_row(1, after, None, assess(val)))
        result.test = assess(test)
        result.history[-1]["test_acc"] = result.test["acc"]  # as the training path does
        return result

    end = start if finalize else cfg.epochs  # finalize: the completed epochs, no more
    net = model  # what training calls: under torchrun the DDP wrapper (after a resume's load: same start)
    if group.active and end > start:
        dev = torch.device(device)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                  process_group=group.handle,
                                                  find_unused_parameters=_leaves_parameters_out(model, task, train, dev))
    micro_batches = math.ceil(len(train) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_batches / cfg.grad_accum)  # optimizer steps: what the schedule counts
    # Only on a terminal (not in logs or CI); and no bar object at all otherwise: a signal arriving
    # while tqdm builds even a disabled bar makes it print an error from its destructor.
    show_bar = progress and sys.stderr.isatty() and group.is_main
    signalled = []
    with _sigterm_as_interrupt(signalled):
        try:
            for epoch in range(start, end):
                t0 = time.perf_counter()
                net.train()
                total = torch.zeros((), device=device, dtype=torch.float64)
                terms = 0
                # under torchrun each process reads, decodes and augments only its share of every batch
                batches = bar = train.train_batches(cfg.batch_size, device, gen, augment=cfg.augment,
                                                    share=(group.rank, group.world) if group.active else None)
                if show_bar:
                    batches = bar = tqdm(batches, total=micro_batches, desc=f"epoch {epoch + 1}", unit="batch",
                                         leave=False, dynamic_ncols=True)
                batches = iter(batches)
                for i in range(steps_per_epoch):
                    micro = list(itertools.islice(batches, cfg.grad_accum))
                    if not micro:
                        break
                    for g in opt.param_groups:
                        g["lr"] = _lr_at(cfg, epoch * steps_per_epoch + i, steps_per_epoch)
                    opt.zero_grad(set_to_none=True)
                    summed, weight = accumulate(net, task, micro, amp, group)
                    opt.step()
                    total += summed
                    terms = terms + weight  # a tensor for token data: summed on the device
                if show_bar:
                    bar.close()
                if group.active:  # every process's terms: the one-process mean
                    both = torch.stack([total, torch.as_tensor(terms, dtype=torch.float64, device=total.device)])
                    total, terms = group.all_reduce(both.to(group.device), "sum")
                train_loss = float(total) / max(int(terms), 1)  # sync point: once per epoch
                report = stripper.step(val)
                row = _history_row(epoch + 1, report, train_loss, assess(val))
                row["seconds"] = round(time.perf_counter() - t0, 3)
                result.history.append(row)
                if state_path is not None and group.is_main:
                    _save_state(state_path, model, opt, stripper, result.history, gen, cfg, epoch + 1, source)
                if on_epoch is not None:
                    on_epoch(row)
        except (KeyboardInterrupt, RuntimeError, DeadscanError) as e:
            if not isinstance(e, KeyboardInterrupt) and not (group.active and signalled):
                raise
            done = len(result.history)
            raise Interrupted(f"interrupted during epoch {done + 1}; {done} epoch(s) saved"
                              + (f" in {state_path}" if state_path else "")) from None
    result.test = assess(test)
    if result.history:
        result.history[-1]["test_acc"] = result.test["acc"]
    return result

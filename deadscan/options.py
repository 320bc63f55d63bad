"""Settings of a run, resolved once into frozen objects: what the commands take, what summary.json records
and what a reuse (``strip --from``) reads back. No torch: the command line's help reads its defaults here."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from .defaults import DEFAULTS

SPLITS = ("train", "val", "test", "all")
IMAGEFOLDER = "imagefolder:"  # --data imagefolder:PATH
CRITERIA = ("weight", "contribution")  # how a dead neuron's weights are ranked for pruning
METHODS = ("strip", "redo")  # revive by Synaptic Stripping, or re-initialise (the ReDo baseline)
PRUNE_RULES = ("floor", "reference")  # how many weights one strip step prunes (README "The strip step")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings. Defaults follow the paper's ViT protocol (Table II and its reference code) where
    deadscan can: AdamW with weight decay 5e-5, peak lr 1e-3 after 5 warm-up epochs, cosine decay to 1e-5,
    batch 128, stripping every epoch at rate 0.1. Differences (README "Fine-tuning defaults"): crop+flip
    instead of AutoAugment unless --augment autoaugment; the MLP ablation used batch 64, no warm-up and a
    constant lr."""

    epochs: int = 50
    every: int = 1  # strip every K epochs
    rate: float = 0.1  # fraction of a dead neuron's remaining incoming weights pruned per step
    criterion: str = "weight"  # see CRITERIA
    prune_rule: str = "floor"  # see PRUNE_RULES
    strip: bool = True  # False: the baseline run (detect only)
    method: str = "strip"  # see METHODS
    optimizer: str = "adamw"  # the paper's (decoupled weight decay)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 5e-5  # the paper's
    warmup: int = 5  # epochs of linear warm-up from 0
    schedule: str = "cosine"  # see SCHEDULES
    final_lr: float = 1e-5  # learning rate at the end of the cosine schedule
    batch_size: int = 128  # samples per optimizer step (per micro-batch with grad_accum > 1)
    eval_batch_size: int = 512  # samples per scan / evaluation batch
    augment: str = "default"  # crop+flip for CIFAR-like images; see deadscan.data.parse_augment
    train_seed: int = 0  # shuffling, augmentation, ReDo's re-initialisation (not the data split)
    grad_accum: int = 1  # micro-batches per optimizer step (the schedule and strip steps count optimizer steps)
    task: str = "classification"  # classification | causal_lm (see finetune.TASKS)

    def warnings(self) -> list[str]:
        """Settings that run but cannot do what they look like they do (one line each)."""
        out = []
        if self.strip and self.epochs > 0 and self.every > self.epochs:
            out.append(f"--every {self.every} is more than --finetune {self.epochs}: no strip step will run")
        if self.epochs > 0 and self.warmup >= self.epochs:
            out.append(f"--finetune {self.epochs} is not more than --warmup {self.warmup}: the whole run is "
                       "learning-rate warm-up (pass a smaller --warmup, e.g. --warmup 0)")
        return out


@dataclass(frozen=True)
class DataOptions:
    """Which data and how it is read and split. ``None``: not given (the dataset's preset or deadscan's
    default; a reuse fills it from the run it reuses). The split seed is the data's, never training's."""

    name: str | None = None  # --data
    root: str | None = None  # --data-root
    download: bool = False
    split_seed: int | None = None  # seed of the train/val/test permutation (default DEFAULTS.seed)
    val_fraction: float | None = None  # default DEFAULTS.val_fraction
    mean: object = None  # per-channel values or a comma-separated string
    std: object = None
    resize: int | None = None
    channels: int | None = None
    corruption: str | None = None  # cifar10-c / cifar100-c blocks
    severity: object = None
    seq_len: int | None = None  # token data
    tokenizer: str | None = None
    text_field: str | None = None

    # What a run records (summary.json "data") and a reuse takes back: enough to cut the same samples again.
    REUSED = ("split_seed", "val_fraction", "mean", "std", "resize", "channels")
    REUSED_TOKENS = ("tokenizer", "text_field", "seq_len")

    def over(self, recorded: "DataOptions") -> "DataOptions":
        """These options, each one not given taken from ``recorded``: what the user says wins."""
        return replace(self, **{f.name: getattr(recorded, f.name) for f in fields(self)
                                if getattr(self, f.name) is None or getattr(self, f.name) is False})  # 0 is given

    def load_kwargs(self) -> dict:
        """Keywords of ``deadscan.data.load_data``; defaults for what is still not given."""
        kw = {"root": self.root, "download": self.download,
              "seed": DEFAULTS.seed if self.split_seed is None else self.split_seed,
              "val_fraction": DEFAULTS.val_fraction if self.val_fraction is None else self.val_fraction}
        for name in ("mean", "std", "resize", "channels", "corruption", "severity", "seq_len", "tokenizer",
                     "text_field"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        return kw

    def absolute(self) -> "DataOptions":
        """Paths made absolute (data files and folders, --data-root, --tokenizer), so the run's record finds
        them again from any directory; names (digits, cifar10, fake:...) stay as they are."""
        def path(p):
            return os.path.abspath(p) if p is not None and os.path.exists(p) else p

        name = self.name
        if name is not None and name.startswith(IMAGEFOLDER) and os.path.exists(name[len(IMAGEFOLDER):]):
            name = IMAGEFOLDER + os.path.abspath(name[len(IMAGEFOLDER):])
        else:
            name = path(name)
        return replace(self, name=name, root=path(self.root), tokenizer=path(self.tokenizer))

    @classmethod
    def from_record(cls, data: dict) -> "DataOptions":
        """The options a run's summary.json "data" record (checked by runfolder) says it used."""
        taken = {"name": data.get("name"), "root": data.get("root"), "split_seed": data.get("seed"),
                 **{k: data.get(k) for k in cls.REUSED if k != "split_seed"}}
        if data.get("kind") == "tokens":  # how the text was cut into sequences, so a strip cuts the same ones
            taken.update({k: data.get(k) for k in ("tokenizer", "text_field")})
            if data.get("tokenizer") is not None:
                taken["seq_len"] = data.get("seq_len")
        if taken["channels"] is not None:
            taken["channels"] = int(taken["channels"])
        return cls(**taken)


@dataclass(frozen=True)
class LoadOptions:
    """How the checkpoint is read."""

    arch: str | None = None  # architecture spec for a plain state dict
    trust_pickle: bool = False  # unpickle a full-model pickle (runs its code)
    allow_globals: tuple[str, ...] = ()  # names a weights-only pickle may import


@dataclass(frozen=True)
class OutputOptions:
    """Where and how a run writes."""

    out: str | None = None  # None: the command's default (inspect: DEFAULTS.out_dir; strip: <--from>/strip)
    overwrite: bool = False  # replace what an earlier run left in ``out``
    plotlyjs: str = DEFAULTS.plotlyjs  # inline | cdn | directory
    csv: bool = False  # also sites.csv and neurons.csv

"""Data vs model: one clear line when the inputs or labels do not fit the model."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import DataError, one_line
from ..locate import raised_in  # names the module whose forward raised (a model bug, or the shape)
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .dataset import Dataset


def model_input(model: nn.Module) -> tuple[str, str, int] | None:
    """What the model's first weight layer (in registration order) takes, if it can tell:
    ``("channels", name, in_channels)`` for a Conv, ``("features", name, in_features)`` for a Linear."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return "channels", name, int(m.in_channels)
        if isinstance(m, nn.Linear) and int(m.in_features) > 0:
            return "features", name, int(m.in_features)
    return None


def _fix_hint(expect, shape: tuple) -> str:
    if expect is None or len(shape) != 3:
        return "check --arch, or the data's shape"
    kind, _, want = expect
    c, h, w = shape
    if kind == "channels":
        return f"pass --channels {want}" if want != c and want in (1, 3) else "check --arch, or --resize"
    for cc in (c, 1, 3):
        side = math.isqrt(want // cc) if want % cc == 0 else 0
        if side and side * side * cc == want and (cc, side, side) != (c, h, w):
            flags = ([f"--channels {cc}"] if cc != c else []) + ([f"--resize {side}"] if (side, side) != (h, w) else [])
            return "pass " + " ".join(flags)
    return "check --arch, or the data's shape"


def check_fits(model: nn.Module, ds: Dataset, device: torch.device) -> None:
    """One forward on two samples: a clear line if the data's shape or labels do not fit the model."""
    if getattr(ds, "kind", None) == "tokens":
        return _check_tokens_fit(model, ds, device)
    shape = tuple(int(s) for s in ds.x.shape[1:])
    shown = "x".join(map(str, shape))
    xb = ds.prepare(ds.x[:2].to(device))
    was_training = model.training
    try:
        with torch.inference_mode():
            out = model.eval()(xb)
    except Exception as e:  # any failure here is a data/model mismatch to explain
        expect = model_input(model)
        if expect is None:
            wants = "what the model takes is unknown"
        elif expect[0] == "channels":
            wants = f"the model's first layer {expect[1] or '(root)'} takes {expect[2]} input channels, " \
                    f"the data has {shape[0]}"
        else:
            wants = f"the model's first layer {expect[1] or '(root)'} takes {expect[2]} input features, " \
                    f"the data has {math.prod(shape)} per sample"
        raise DataError(
            f"the model cannot take --data {ds.name} inputs of shape {shape} ({shown}; {wants}; "
            f"{type(e).__name__}{raised_in(e, model)}: {one_line(e, 160)}); {_fix_hint(expect, shape)}"
        ) from None
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and out.ndim == 2 and ds.classes > out.shape[1]:
        raise DataError(
            f"--data {ds.name} has labels up to {ds.classes - 1} but the model outputs {out.shape[1]} classes"
        )


def _check_tokens_fit(model: nn.Module, ds, device: torch.device) -> None:
    """Token ids inside the model's vocabulary, a tokenizer no larger than it, sequences its positions
    cover; then one forward on two sequences. A language model's outputs are not class scores: no label check."""
    from .tokens import max_positions, model_kwargs, vocab_size

    vocab = vocab_size(model)
    if vocab is None:
        raise DataError(f"--data {ds.name} is token data but the model has no token embedding (no "
                        "get_input_embeddings, no config.vocab_size); token data is for language models")
    if ds.tokenizer_size is not None and ds.tokenizer_size > vocab:
        raise DataError(f"the tokenizer ({ds.info.get('tokenizer')}) has {ds.tokenizer_size} tokens but the model's "
                        f"vocabulary has {vocab}: it does not belong to this model; pass the model's own --tokenizer")
    if ds.max_id >= vocab:
        raise DataError(f"--data {ds.name}: token id {ds.max_id} is outside the model's vocabulary of {vocab} "
                        f"(ids 0 to {vocab - 1}); tokenise with the model's own tokenizer")
    limit = max_positions(model)
    if limit is not None and ds.seq_len > limit:
        raise DataError(f"--data {ds.name}: sequences of {ds.seq_len} tokens but the model takes at most {limit} "
                        f"positions; pass --seq-len {limit} or less")
    batch = {k: v.to(device) for k, v in ds.example(2).items()}
    was_training = model.training
    try:
        with torch.inference_mode():
            model.eval()(**model_kwargs(model, batch))
    except Exception as e:
        raise DataError(f"the model cannot take --data {ds.name} token batches of shape {tuple(batch['input_ids'].shape)} "
                        f"({type(e).__name__}{raised_in(e, model)}: {one_line(e, 160)}); is it a language model?") from None
    finally:
        model.train(was_training)

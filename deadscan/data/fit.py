"""Data vs model: one clear line when the inputs or labels do not fit the model."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import DataError, one_line
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
        from ..scan import raised_in  # names the module whose forward raised (a model bug, or the shape)

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

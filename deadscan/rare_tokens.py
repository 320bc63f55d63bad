"""Which tokens fire a language model's rarest-firing live neurons: a second, bounded pass over token data.

For each site whose pre-activation is its feeding layer's output (no per-feature op between them, a Linear
or Hugging Face Conv1D: neurons on the last axis), the ``per_site`` live neurons that fired least often in the
scan are watched; every real position (attention_mask 1) where one fires adds one to (neuron, token). The
token of a position is the token the model read there: ``input_ids`` for decoder-only and encoder stacks, the
decoder's input (the ids shifted right) in an encoder-decoder's decoder stack.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from torch import nn

from .data.tokens import TokenDataset, model_kwargs
from .scan import ScanResult

RARE_PER_SITE = 5  # rarest live neurons listed per site
TOKENS_PER_NEURON = 5  # most frequent firing tokens listed per neuron
MAX_SEQUENCES = 512  # sequences read by the second pass (the first ones of the split)


def rarest_live(active: np.ndarray, k: int) -> list[int]:
    """The ``k`` neurons with the fewest firing elements among those that fired at all (ties: lower index)."""
    live = np.flatnonzero(active > 0)
    order = np.lexsort((live, active[live]))  # by count, then index
    return live[order[:k]].tolist()


def rare_tokens(model: nn.Module, result: ScanResult, data: TokenDataset, *, batch_size: int, device,
                tokenizer=None, per_site: int = RARE_PER_SITE, per_neuron: int = TOKENS_PER_NEURON,
                max_sequences: int = MAX_SEQUENCES) -> dict:
    """summary.json "rare_tokens": per site, its rarest live neurons, their scan frequency and the tokens
    that fire them in the first ``max_sequences`` sequences of ``data``."""
    watched = {}
    for r in result.sites:
        f = r.site.feeding
        if f is None or f.chain or f.kind not in ("linear", "hf_conv1d") or not (r.active > 0).any():
            continue
        watched[r.site.name] = (r, rarest_live(r.active, per_site))
    counts: dict[str, list[Counter]] = {name: [Counter() for _ in idx] for name, (_, idx) in watched.items()}
    current: dict[str, torch.Tensor] = {}  # the batch's token ids per stack, and its real positions
    decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)

    def hook(name, idx):
        cols = torch.tensor(idx)

        def record(_module, _args, out):
            if not isinstance(out, torch.Tensor):
                return
            mask = current["mask"].to(out.device)  # a dispatched model's layers may sit on other devices
            if out.ndim == 2 and out.shape[0] == mask.numel():  # (batch * tokens, neurons), as OPT flattens
                out = out.view(*mask.shape, -1)
            if out.ndim != 3 or out.shape[:2] != mask.shape:
                return  # not (batch, tokens, neurons): positions unknown
            ids = current["decoder" if decoder and name.startswith("decoder.") else "encoder"].to(out.device)
            fired = (out.index_select(-1, cols.to(out.device)) > 0) & mask.unsqueeze(-1)
            b, t, j = fired.nonzero(as_tuple=True)
            vocab = int(ids.max()) + 1
            keys, seen = torch.unique(j * vocab + ids[b, t], return_counts=True)  # (neuron, token) pairs
            for key, k in zip(keys.tolist(), seen.tolist()):
                counts[name][key // vocab][key % vocab] += k
        return record

    handles = [model.get_submodule(r.site.feeding.layer).register_forward_hook(hook(name, idx))
               for name, (r, idx) in watched.items()]
    n = min(len(data), max_sequences)
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                batch = {"input_ids": data.input_ids[start:stop].to(device).long(),
                         "attention_mask": data.attention_mask[start:stop].to(device).long()}
                kwargs = model_kwargs(model, batch)
                current["encoder"] = batch["input_ids"]
                current["decoder"] = kwargs.get("decoder_input_ids", batch["input_ids"])
                current["mask"] = batch["attention_mask"] > 0
                model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    sites = {}
    for name, (r, idx) in watched.items():
        rows = []
        for neuron, c in zip(idx, counts[name]):
            top = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:per_neuron]
            rows.append({"neuron": int(neuron), "frequency": float(r.active[neuron]) / max(r.elements, 1),
                         "fired": int(sum(c.values())),
                         "tokens": [[_text(tokenizer, tok), int(k)] for tok, k in top]})
        sites[name] = rows
    return {"sequences": n, "sites": sites}


def _text(tokenizer, token: int) -> str:
    """How a token reads: the tokenizer's text for it (special marks kept), else its id."""
    if tokenizer is None:
        return f"#{token}"
    try:
        text = tokenizer.decode([token])
    except Exception:  # an id outside the tokenizer's vocabulary: show the id
        return f"#{token}"
    return text if text.strip() else repr(text)

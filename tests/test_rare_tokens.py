"""The tokens that fire a language model's rarest-firing live neurons, on a model whose neuron i fires exactly
where token i is read (so every count is known by construction)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import deadscan
from deadscan.data.tokens import TokenDataset
from deadscan.rare_tokens import rare_tokens, rarest_live

V = 8


class OneHotLM(nn.Module):
    """embed = identity, fc1 = identity with bias -0.5: neuron i's pre-activation is 0.5 at token i, -0.5 else."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, V)
        self.fc1 = nn.Linear(V, V)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(V, V)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(V))
            self.fc1.weight.copy_(torch.eye(V))
            self.fc1.bias.fill_(-0.5)

    def forward(self, input_ids, attention_mask=None):
        return self.fc2(self.act(self.fc1(self.embed(input_ids))))


def _data() -> TokenDataset:
    ids = torch.tensor([[0, 0, 0, 1, 2, 2, 3, 3],
                        [4, 4, 4, 4, 5, 5, 5, 0],
                        [6, 6, 0, 0, 0, 0, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0],  # token 3 only at padded positions: neuron 3 is dead
                         [1, 1, 1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1, 1, 0, 0]])
    return TokenDataset("toy", "all", ids, mask)


def test_rarest_live_neurons_and_the_tokens_that_fire_them():
    model, data = OneHotLM().eval(), _data()
    result = deadscan.scan(model, data, batch_size=2)
    real = data.input_ids[data.attention_mask > 0].numpy()
    assert result["act"].active.tolist() == np.bincount(real, minlength=V).tolist()  # [8, 1, 2, 0, 4, 3, 2, 0]
    assert result["act"].dead_indices == [3, 7]
    assert rarest_live(result["act"].active, 4) == [1, 2, 6, 5]  # counts 1, 2, 2, 3 (ties by index)
    out = rare_tokens(model, result, data, batch_size=2, device="cpu", per_site=4, per_neuron=3)
    assert out["sequences"] == 3
    assert out["sites"]["act"] == [
        {"neuron": 1, "frequency": 1 / 20, "fired": 1, "tokens": [["#1", 1]]},
        {"neuron": 2, "frequency": 2 / 20, "fired": 2, "tokens": [["#2", 2]]},
        {"neuron": 6, "frequency": 2 / 20, "fired": 2, "tokens": [["#6", 2]]},
        {"neuron": 5, "frequency": 3 / 20, "fired": 3, "tokens": [["#5", 3]]},
    ]


def test_only_the_first_sequences_are_read_and_a_tokenizer_names_the_tokens():
    class Words:
        def decode(self, ids):
            return " ".join(f"w{i}" for i in ids)

    model, data = OneHotLM().eval(), _data()
    result = deadscan.scan(model, data, batch_size=3)
    out = rare_tokens(model, result, data, batch_size=3, device="cpu", per_site=2, tokenizer=Words(),
                      max_sequences=1)
    assert out["sequences"] == 1
    # the first sequence holds token 1 once and token 2 twice (token 6 only later)
    assert out["sites"]["act"] == [
        {"neuron": 1, "frequency": 1 / 20, "fired": 1, "tokens": [["w1", 1]]},
        {"neuron": 2, "frequency": 2 / 20, "fired": 2, "tokens": [["w2", 2]]},
    ]


def test_sites_with_an_op_between_layer_and_relu_are_not_watched():
    class Scaled(OneHotLM):
        def forward(self, input_ids, attention_mask=None):
            return self.fc2(self.act(2.0 * self.fc1(self.embed(input_ids))))

    model, data = Scaled().eval(), _data()
    result = deadscan.scan(model, data)
    assert result["act"].site.feeding.chain  # fc1's output is not the pre-activation itself
    assert rare_tokens(model, result, data, batch_size=4, device="cpu")["sites"] == {}

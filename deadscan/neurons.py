"""What follows from per-neuron counts alone (dead, frequency, max output): numpy only, no torch, so
the report of a stats.h5 needs no torch."""

from __future__ import annotations

import numpy as np


class PerNeuron:
    """What follows from the per-neuron counts alone; shared by scan results and stats.h5 readers.
    Needs ``active``, ``elements``, ``pre_max`` and an ``activation`` (relu | relu6)."""

    @property
    def neurons(self) -> int:
        return int(self.active.shape[0])

    @property
    def dead(self) -> np.ndarray:
        """Output exactly zero on every element scanned."""
        return self.active == 0

    @property
    def frequency(self) -> np.ndarray:
        """Fraction of elements where the neuron fired."""
        return self.active / max(self.elements, 1)

    @property
    def out_max(self) -> np.ndarray:
        top = 6.0 if self.activation == "relu6" else np.inf
        return np.clip(self.pre_max, 0.0, top)

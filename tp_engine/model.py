"""A trained model: its config and weights, saved as plain files, loadable by either backend."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tp_engine.config import TrialConfig
from tp_engine.losses import LOSSES


@dataclass
class TrainedModel:
    config: TrialConfig
    state: dict[str, np.ndarray]  # W1, b1, ..., (V2, c2, ... for dtp)
    loss: str
    mode: str

    @property
    def n_layers(self) -> int:
        return sum(1 for k in self.state if k.startswith("W"))

    def logits(self, x: np.ndarray, backend: str = "numpy", device: str = "auto") -> np.ndarray:
        """The affine output for raw inputs x (rows), computed on the chosen backend."""
        from tp_engine.backends import get_backend

        B = get_backend(backend, device)
        h = B.asarray(np.asarray(x, np.float32))
        act = self.config.activation
        from tp_engine.ops import activation

        op = activation(act)
        L = self.n_layers
        for l in range(1, L + 1):
            a = B.matmul(h, B.asarray(self.state[f"W{l}"])) + B.asarray(self.state[f"b{l}"])
            h = op.f(B, a) if l < L else a
        return np.asarray(B.to_numpy(h))

    def predict(self, x: np.ndarray, backend: str = "numpy") -> np.ndarray:
        """Class indices (classification) or reconstructions (autoencoder)."""
        z = self.logits(x, backend)
        if self.mode == "classification":
            return np.argmax(z, axis=1)
        from tp_engine.backends.numpy_backend import NumpyBackend

        return np.asarray(LOSSES[self.loss].output(NumpyBackend(), z))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.savez(path / "weights.npz", **self.state)
        meta = {"config": self.config.model_dump(), "loss": self.loss, "mode": self.mode}
        (path / "model.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrainedModel":
        path = Path(path)
        meta = json.loads((path / "model.json").read_text())
        with np.load(path / "weights.npz") as z:
            state = {k: z[k] for k in z.files}
        return cls(TrialConfig(**meta["config"]), state, meta["loss"], meta["mode"])

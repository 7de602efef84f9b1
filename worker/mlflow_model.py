"""The trained model as an MLflow pyfunc: raw input rows in, classes (or reconstructions) out."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np

ENGINE_DIR = Path(__file__).resolve().parent.parent / "tp_engine"
PIP_REQUIREMENTS = ["numpy==2.4.6", "pydantic==2.14.3", "mlflow==3.17.2", "numba==0.68.1", "PyYAML==6.0.3"]


class TPModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from tp_engine.model import TrainedModel

        self.model = TrainedModel.load(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        x = np.asarray(getattr(model_input, "values", model_input), dtype=np.float32)
        return self.model.predict(x)


def log_model(model, workdir: Path, example: np.ndarray) -> str:
    """Log ``model`` (a TrainedModel) to the active run; returns the model URI."""
    from mlflow.models import infer_signature

    path = model.save(workdir / "tp_model")
    preds = model.predict(example)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=TPModel(),
        artifacts={"model": str(path)},
        # The engine travels with the model, so it loads wherever mlflow and numpy are installed.
        code_paths=[str(ENGINE_DIR), str(Path(__file__))],
        pip_requirements=PIP_REQUIREMENTS,
        signature=infer_signature(example, preds),
    )
    return info.model_uri

"""Default locations, importable without MLflow or Ray (the CLIs start fast)."""
from __future__ import annotations

import os


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the embedded default: sqlite:///<cwd>/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"

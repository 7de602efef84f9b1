"""Default locations, importable without MLflow or Ray (the CLIs start fast)."""
from __future__ import annotations

import os
from pathlib import Path


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the embedded default: sqlite:///<cwd>/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"


def data_dir() -> Path:
    """$SWEEP_DATA_DIR (caches, the queue database, Tune storage, each sweep's files), else
    <cwd>/sweep_data; created on first call. The worker's one reader of the variable: the service
    (service/settings.py) hands it to the Ray jobs it starts."""
    env = os.environ.get("SWEEP_DATA_DIR")
    path = Path(env).expanduser() if env else Path.cwd() / "sweep_data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """data_dir()/cache: the download cache the worker gives the engine; created on first call."""
    path = data_dir() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path

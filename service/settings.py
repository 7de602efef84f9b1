"""Every environment variable the service and its CLIs read, in one place (the compose file and
scripts/entrypoint.sh use the same names; tests check they agree)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV = {
    "MLFLOW_TRACKING_URI": "where runs go; embedded default: sqlite:///<cwd>/mlflow.db",
    "RAY_ADDRESS": "the Ray cluster: for the service, its Jobs API URL (http://head:8265)",
    "SWEEP_SERVICE_URL": "the API to submit to; absent means embedded",
    "SWEEP_DATA_DIR": "caches, the queue database and Tune storage (shared by every Ray node)",
    "SWEEP_DB_URL": "the queue database; default sqlite:///$SWEEP_DATA_DIR/queue.db",
    "SWEEP_API_TOKEN": "bearer token; required whenever the API listens beyond loopback",
    "SWEEP_API_HOST": "API bind address (default 127.0.0.1)",
    "SWEEP_API_PORT": "API port (default 8000)",
    "SWEEP_MAX_CONCURRENT": "sweeps running at once on the cluster (default 1)",
}


def data_dir() -> Path:
    """$SWEEP_DATA_DIR, else ./sweep_data (created): read through the worker's function, which the
    Ray jobs the service starts use too (the dispatcher passes them this directory)."""
    from worker.paths import data_dir as _d

    return _d()


def queue_url(data: Path | None = None) -> str:
    """$SWEEP_DB_URL, else a SQLite file in the data directory."""
    url = os.environ.get("SWEEP_DB_URL")
    if url:
        return url
    data = data if data is not None else data_dir()
    data.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{data.resolve() / 'queue.db'}"


@dataclass(frozen=True)
class Settings:
    tracking_uri: str
    ray_address: str | None
    service_url: str | None
    data_dir: Path
    db_url: str
    api_token: str | None
    api_host: str
    api_port: int
    max_concurrent: int

    @property
    def storage_path(self) -> Path:
        """Tune's storage; the same path on every node of a cluster."""
        return self.data_dir / "tune"

    @property
    def sweeps_dir(self) -> Path:
        """Per-sweep files (spec, progress, result) shared with the Ray Job."""
        return self.data_dir / "sweeps"


def load() -> Settings:
    from worker.paths import default_tracking_uri

    data = data_dir()
    return Settings(
        tracking_uri=default_tracking_uri(),
        ray_address=os.environ.get("RAY_ADDRESS") or None,
        service_url=(os.environ.get("SWEEP_SERVICE_URL") or "").rstrip("/") or None,
        data_dir=data,
        db_url=queue_url(data),
        api_token=os.environ.get("SWEEP_API_TOKEN") or None,
        api_host=os.environ.get("SWEEP_API_HOST", "127.0.0.1"),
        api_port=int(os.environ.get("SWEEP_API_PORT", "8000")),
        max_concurrent=int(os.environ.get("SWEEP_MAX_CONCURRENT", "1")),
    )

"""One local Ray (2 CPUs) for a test module, with the settings worker.sweep._init_ray makes when it
starts Ray itself, and the module's own variables (e.g. trial hooks and their markers) reaching
every Ray worker process."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
            "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


@contextmanager
def local_ray(env_vars: dict[str, str]):
    """ray.init on a fresh local cluster for the duration, then shut it down and restore the
    environment. env_vars and the repository root on PYTHONPATH (trial hooks live in tests/) are
    set in this process before ray.init, so every worker the raylet starts inherits them, a
    later job's included (a driver subprocess joining the cluster), and passed as runtime_env
    variables as well."""
    import ray

    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**SETTINGS, **env_vars, "PYTHONPATH": path}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if ray.is_initialized():
            ray.shutdown()
        for attempt in range(3):
            try:
                ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {**env_vars, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}})
                break
            except Exception:  # "timed out during startup": the raylet gets 30 s, too few when loaded
                ray.shutdown()
                if attempt == 2:
                    raise
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

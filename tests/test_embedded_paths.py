"""The embedded default keeps one data directory for the whole sweep: trials run in working
directories of Tune's, and with SWEEP_DATA_DIR unset each used to resolve <its cwd>/sweep_data,
so every trial downloaded MNIST again and kept its own MLflow spool where the driver never looks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
name: tp-test-paths
base: {dataset: xor, rule: bp, hidden: [8], epochs: 2, batch_size: 50, subset: 300, diag_size: 50}
search: {method: grid, seeds: [0, 1], max_concurrent_trials: 2}
"""


def test_trials_use_the_drivers_data_dir_when_sweep_data_dir_is_unset(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    record = tmp_path / "data_dirs.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEP_DATA_DIR", "MLFLOW_TRACKING_URI")}
    env.update({"TP_TRIAL_HOOKS": "tests.faults:record_data_dir", "TP_RECORD_DATA_DIR": str(record),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "RAY_USAGE_STATS_ENABLED": "0"})
    out = subprocess.run([sys.executable, "-m", "service.submit", "spec.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    seen = record.read_text().split()
    assert len(seen) == 4, seen  # 2 trials x 2 epochs, each recorded from inside its trial
    assert set(seen) == {str((tmp_path / "sweep_data").resolve())}, seen

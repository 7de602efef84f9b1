"""The Ray Job entrypoint of one sweep: ``python -m worker.job SWEEP_ID``.

The service writes the spec to ``$SWEEP_DATA_DIR/sweeps/<id>/spec.yaml`` (storage every node
shares) and submits this module as a Ray Job whose ``submission_id`` is the sweep id. The job runs
(or resumes) the sweep and leaves, beside the spec, files the service reads:
``started.json`` (MLflow experiment and parent run), ``progress.json`` (trials done, running,
pending, best per rule) and ``result.json`` (the final summary)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def sweep_dir(data_dir: Path, sweep_id: str) -> Path:
    return data_dir / "sweeps" / sweep_id


def write_json(path: Path, data: Any) -> None:
    """Atomic, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


def write_started(folder: Path, experiment_id: str, parent_run_id: str, tracking_uri: str, name: str) -> None:
    """started.json: where the sweep logs, for the queue and for status / report."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "started.json", {"experiment_id": experiment_id, "parent_run_id": parent_run_id,
                                         "tracking_uri": tracking_uri, "experiment_name": name})


def main(argv: list[str] | None = None) -> int:
    from tp_engine.data import data_dir
    from worker.spec import load_spec
    from worker.sweep import run_sweep
    from worker.tracking import default_tracking_uri

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m worker.job SWEEP_ID", file=sys.stderr)
        return 2
    sweep_id = argv[0]
    d = sweep_dir(data_dir(), sweep_id)
    spec = load_spec(d / "spec.yaml")
    tracking_uri = default_tracking_uri()
    last = [0.0]

    def on_start(exp_id: str, parent_id: str) -> None:
        write_started(d, exp_id, parent_id, tracking_uri, spec.name)

    def on_progress(p) -> None:
        if time.time() - last[0] > 1.0 or p.done == p.total:
            last[0] = time.time()
            write_json(d / "progress.json", p.as_dict())

    res = run_sweep(spec, tracking_uri, str(data_dir() / "tune"), sweep_id=sweep_id,
                    on_progress=on_progress, on_start=on_start)
    if res.progress:
        write_json(d / "progress.json", res.progress)
    write_json(d / "result.json", res.as_dict())
    print(res.table_markdown)
    print(f"sweep {sweep_id}: {res.state} {res.trial_status}")
    return {"succeeded": 0, "interrupted": 130}.get(res.state, 1)


if __name__ == "__main__":
    raise SystemExit(main())

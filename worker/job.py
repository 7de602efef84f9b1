"""The Ray Job entrypoint of one sweep: ``python -m worker.job SWEEP_ID``.

The service writes the spec to ``$SWEEP_DATA_DIR/sweeps/<id>/spec.yaml`` (storage every node
shares) and submits this module as a Ray Job whose ``submission_id`` is the sweep id. The job runs
(or resumes) the sweep and leaves, beside the spec, the files the service reads (started.json,
progress.json, result.json: see ``worker.lifecycle``). Its exit code is the sweep's outcome: 0
succeeded, 130 interrupted (resumable), 1 failed."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from worker.lifecycle import SweepFolder, SweepRun
    from worker.paths import data_dir
    from worker.spec import load_spec
    from worker.tracking import default_tracking_uri

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m worker.job SWEEP_ID", file=sys.stderr)
        return 2
    folder = SweepFolder(data_dir(), argv[0])
    spec = load_spec(folder.spec_path)
    run = SweepRun(folder, spec, default_tracking_uri())
    res = run.run()
    outcome = run.finish(res)
    print(res.table_markdown)
    print(f"sweep {folder.sweep_id}: {res.state} {res.trial_status}")
    return outcome.exit_code


if __name__ == "__main__":
    raise SystemExit(main())

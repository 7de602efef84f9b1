"""Faults the tests inject into real trials through the worker's trial hooks
(worker.trainable.TRIAL_HOOKS_ENV, e.g. ``TP_TRIAL_HOOKS=tests.faults:fail_once_at_epoch_2``).

Each fault is driven by a marker file whose path its own variable gives, so a test arms and
disarms it from outside the trial processes. The variables must reach those processes (the
tests set them before ray.init and in the runtime_env), as must the repository root on
PYTHONPATH so they can import this module.
"""
from __future__ import annotations

import os
from pathlib import Path

from worker.trainable import BEFORE_EPILOGUE, EPOCH_END, HookEvent

# While this path is missing, the first trial to end epoch 2 creates it (writing its trial id)
# and raises: one failure, so retrying from the checkpoint can be exercised.
FAIL_ONCE_MARKER_ENV = "TP_FAULT_FAIL_ONCE_MARKER"
# While this path exists, a trial's deferred epilogue (its model logged behind its last report)
# fails before logging anything, as if the process had died after that report.
EPILOGUE_MARKER_ENV = "TP_FAULT_EPILOGUE_MARKER"


def fail_once_at_epoch_2(event: HookEvent) -> None:
    marker = os.environ.get(FAIL_ONCE_MARKER_ENV)
    if marker and event.point == EPOCH_END and event.epoch == 2 and not os.path.exists(marker):
        Path(marker).write_text(event.trial_id)
        raise RuntimeError(f"injected failure ({FAIL_ONCE_MARKER_ENV})")


def fail_deferred_epilogue(event: HookEvent) -> None:
    marker = os.environ.get(EPILOGUE_MARKER_ENV)
    if marker and event.point == BEFORE_EPILOGUE and event.deferred and os.path.exists(marker):
        raise RuntimeError(f"injected epilogue failure ({EPILOGUE_MARKER_ENV})")


# Not a fault: where a trial process keeps its data (worker.paths.data_dir), written to the file
# this variable names, so a test can check what trials resolve in their own working directories.
DATA_DIR_RECORD_ENV = "TP_RECORD_DATA_DIR"


def record_data_dir(event: HookEvent) -> None:
    from worker.paths import data_dir

    out = os.environ.get(DATA_DIR_RECORD_ENV)
    if out and event.point == EPOCH_END:
        with open(out, "a") as f:
            f.write(f"{data_dir()}\n")

"""A trial's status, named once for the engine, the worker, the service and the report.

The engine ends a run ``completed`` or ``diverged``; the worker adds what only the sweep knows
(``early_stopped`` by ASHA, ``failed`` after its retries, ``running`` / ``pending`` when the sweep
was interrupted). The values are the strings MLflow tags, JSON files and the queue hold.
"""
from __future__ import annotations

import enum


class TrialStatus(enum.StrEnum):
    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"
    DIVERGED = "diverged"
    FAILED = "failed"
    RUNNING = "running"
    PENDING = "pending"


# Ended, with a result to keep: the trial is not trained again when its sweep resumes.
SETTLED = frozenset({TrialStatus.COMPLETED, TrialStatus.DIVERGED})
# Not ended: the sweep was interrupted and can be resumed.
UNFINISHED = frozenset({TrialStatus.RUNNING, TrialStatus.PENDING})
# Ended, counted as done in a sweep's progress.
DONE = frozenset(TrialStatus) - UNFINISHED

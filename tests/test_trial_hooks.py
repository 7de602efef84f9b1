"""The worker's trial hooks (TP_TRIAL_HOOKS): how a spec is loaded, and the faults the Ray tests
inject through them (tests/faults.py; the trials that run them are in test_worker and test_reuse)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker.trainable import BEFORE_EPILOGUE, EPOCH_END, TRIAL_HOOKS_ENV, HookEvent, trial_hooks  # noqa: E402

from tests import faults  # noqa: E402


def test_no_hooks_by_default(monkeypatch):
    monkeypatch.delenv(TRIAL_HOOKS_ENV, raising=False)
    assert trial_hooks() == ()
    monkeypatch.setenv(TRIAL_HOOKS_ENV, " ")
    assert trial_hooks() == ()


def test_a_spec_loads_its_hooks_in_order_once_per_process(monkeypatch):
    monkeypatch.setenv(TRIAL_HOOKS_ENV, "tests.faults:fail_deferred_epilogue, tests.faults:fail_once_at_epoch_2")
    hooks = trial_hooks()
    assert hooks == (faults.fail_deferred_epilogue, faults.fail_once_at_epoch_2)
    monkeypatch.setattr(importlib, "import_module", lambda name: pytest.fail(f"{name} imported again"))
    assert trial_hooks() is hooks


@pytest.mark.parametrize("item, why", [
    ("tests.no_such_module:hook", "ModuleNotFoundError"),
    ("tests.faults:no_such_hook", "AttributeError"),
    ("tests.faults:FAIL_ONCE_MARKER_ENV", "is not callable"),
    ("tests.faults", "expected module:callable"),
])
def test_a_bad_spec_fails_naming_the_variable(monkeypatch, item, why):
    monkeypatch.setenv(TRIAL_HOOKS_ENV, f"tests.faults:fail_once_at_epoch_2,{item}")
    with pytest.raises(RuntimeError) as e:
        trial_hooks()
    msg = str(e.value)
    assert msg.startswith(f"{TRIAL_HOOKS_ENV}: cannot load the hook {item!r}") and why in msg
    with pytest.raises(RuntimeError):  # not remembered as loaded
        trial_hooks()


def event(point: str, epoch: int, deferred: bool = False) -> HookEvent:
    return HookEvent(point, "trial_0001", "run1", epoch, {"epoch": float(epoch)}, deferred)


def test_fail_once_fault(tmp_path, monkeypatch):
    marker = tmp_path / "fail_once"
    monkeypatch.setenv(faults.FAIL_ONCE_MARKER_ENV, str(marker))
    faults.fail_once_at_epoch_2(event(EPOCH_END, 1))
    faults.fail_once_at_epoch_2(event(BEFORE_EPILOGUE, 2, deferred=True))
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="injected failure"):
        faults.fail_once_at_epoch_2(event(EPOCH_END, 2))
    assert marker.read_text() == "trial_0001"
    faults.fail_once_at_epoch_2(event(EPOCH_END, 2))  # once only


def test_epilogue_fault(tmp_path, monkeypatch):
    marker = tmp_path / "fail_epilogues"
    monkeypatch.setenv(faults.EPILOGUE_MARKER_ENV, str(marker))
    faults.fail_deferred_epilogue(event(BEFORE_EPILOGUE, 3, deferred=True))  # disarmed
    marker.write_text("armed")
    faults.fail_deferred_epilogue(event(BEFORE_EPILOGUE, 3))  # settled in the trial itself: left alone
    faults.fail_deferred_epilogue(event(EPOCH_END, 3))
    with pytest.raises(RuntimeError, match="injected epilogue failure"):
        faults.fail_deferred_epilogue(event(BEFORE_EPILOGUE, 3, deferred=True))

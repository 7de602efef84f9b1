"""Trial processes are reused (Tune's reuse_actors): one process runs trial after trial.

Covered: two different trials run one after the other in one process, and the second one's
per-epoch metrics and final weights equal a fresh process's run of the same config, bit for bit
(nothing of the first trial leaks into it; the dataset the process keeps is handed out read-only,
shared, and a write into it fails);
a trial whose model logging is left undone after its last report (its process died, simulated by
the tests.faults.fail_deferred_epilogue hook) is settled by the driver from its last checkpoint, model included; the
driver's per-trial timing (TrialTimer) and the sweep timing the report reads from the parent run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker import tracking  # noqa: E402
from worker.report import compare_sweep, log_timing, sweep_timing  # noqa: E402
from worker.spec import SweepSpec  # noqa: E402
from worker.sweep import TrialTimer, run_sweep  # noqa: E402
from worker.trainable import PROCESS_TAG, STATE_FILE, TRIAL_HOOKS_ENV  # noqa: E402

from tests.faults import EPILOGUE_MARKER_ENV  # noqa: E402
from tests.local_ray import local_ray  # noqa: E402

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def epilogue_marker(tmp_path_factory) -> Path:
    """The tests.faults.fail_deferred_epilogue marker every Ray worker of this module sees:
    deferred epilogues fail while it exists."""
    return tmp_path_factory.mktemp("marker") / "fail_epilogues"


@pytest.fixture(scope="module", autouse=True)
def ray_local(epilogue_marker):
    with local_ray({TRIAL_HOOKS_ENV: "tests.faults:fail_deferred_epilogue", EPILOGUE_MARKER_ENV: str(epilogue_marker)}):
        yield


@pytest.fixture(autouse=True)
def _fresh_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "sweep_data"))


def sqlite_store(tmp_path: Path, spec: SweepSpec) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    MlflowClient(uri).create_experiment(spec.name, artifact_location=(tmp_path / "artifacts").as_uri())
    return uri


def children(c: MlflowClient, exp_id: str, parent_id: str):
    return c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=100)


def ready_models(exp_id: str, run_id: str) -> list:
    models = mlflow.search_logged_models(experiment_ids=[exp_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    return [m for m in models if str(getattr(m.status, "name", m.status)) == "READY"]


FRESH = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
from worker.spec import SweepSpec
from tp_engine.train import train
spec = SweepSpec.from_yaml(open({spec!r}).read())
res = train(spec.trial_config(json.loads({params!r})))
np.savez({out!r}, **res.checkpoint)
print(json.dumps(res.history))
"""


def fresh_run(tmp_path: Path, spec: SweepSpec, params: dict, name: str) -> tuple[list[dict], dict]:
    """(history, final engine state) of the config trained in a new interpreter."""
    (tmp_path / "spec.yaml").write_text(spec.to_yaml())
    out = tmp_path / f"{name}.npz"
    code = FRESH.format(root=str(ROOT), spec=str(tmp_path / "spec.yaml"), params=json.dumps(params), out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what Ray gives a 1-CPU trial
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    with np.load(out) as z:
        state = {k: z[k] for k in z.files}
    return json.loads(got.stdout.strip().splitlines()[-1]), state


def final_state(storage: Path, run_id: str) -> dict:
    """The trial's last checkpoint (that of its last epoch) found by the run id in its meta."""
    best = None
    for meta_path in storage.rglob("checkpoint_*/meta.json"):
        meta = json.loads(meta_path.read_text())
        state = meta_path.parent / STATE_FILE
        if meta.get("run_id") == run_id and state.exists() and (best is None or meta["epoch"] > best[0]):
            best = (meta["epoch"], state)
    assert best is not None, f"no checkpoint of run {run_id} under {storage}"
    with np.load(best[1]) as z:
        return {k: z[k] for k in z.files if k != "__meta__"}


# Two different trials (rules, widths and learning rates differ) one at a time, so one process
# runs both; the same dataset and seed, so the second is handed the dataset the first loaded.
REUSE_SPEC = """
name: tp-test-reuse
base: {dataset: spiral, hidden: [16], epochs: 3, batch_size: 50, subset: 600, diag_size: 100}
parameters:
  rule: {distribution: values, values: [dtp, bp]}
search: {method: grid, seeds: [0], max_concurrent_trials: 1}
"""


def test_second_trial_in_a_reused_process_equals_a_fresh_run(tmp_path):
    spec = SweepSpec.from_yaml(textwrap.dedent(REUSE_SPEC))
    uri = sqlite_store(tmp_path, spec)
    result = run_sweep(spec, uri, str(tmp_path / "tune"), num_cpus=2)
    assert result.state == "succeeded" and result.trial_status == {"completed": 2}, result.trial_status
    c = MlflowClient(uri)
    runs = sorted(children(c, result.experiment_id, result.parent_run_id), key=lambda r: r.info.start_time)
    assert [r.data.tags["rule"] for r in runs] == ["dtp", "bp"]
    processes = {r.data.tags[PROCESS_TAG] for r in runs}
    assert len(processes) == 1, f"the trials ran in {processes}: the process was not reused"

    for run in runs:
        rule = run.data.tags["rule"]
        # Settled, with its model (logged in the background, behind the next trial or at the end).
        assert run.data.tags[tracking.TAG_STATUS] == "completed" and run.info.status == "FINISHED"
        assert len(ready_models(result.experiment_id, run.info.run_id)) == 1
        expected, state = fresh_run(tmp_path, spec, {"rule": rule, "seed": 0}, rule)
        for key in expected[0]:
            if key in ("epoch", "seconds_per_epoch"):
                continue
            got = sorted(c.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            assert [m.step for m in got] == [1, 2, 3], key
            assert [m.value for m in got] == [h[key] for h in expected], (rule, key)
        got_state = final_state(tmp_path / "tune", run.info.run_id)
        assert set(got_state) == set(state), rule
        for k in state:
            assert np.array_equal(got_state[k], state[k]), (rule, k)

    # The sweep timed its trials, and the report reads the figures back from the parent run.
    t = result.timing
    assert t["trials_timed"] == 2 and t["cores"] == 1 and 0 < t["efficiency"] <= 1.0
    timing = sweep_timing(c, result.parent_run_id)
    assert timing["runs"] == 1 and timing["trials_timed"] == 2
    assert timing["efficiency"] == pytest.approx(t["efficiency"])
    line = compare_sweep(c, result.experiment_id, result.parent_run_id, spec).timing_line()
    assert line.startswith("Sweep efficiency ") and "per-trial overhead" in line


def test_unlogged_epilogue_is_settled_from_the_checkpoint(tmp_path, epilogue_marker, capsys):
    """The trial reports its last epoch, then its model logging never happens (as if its process
    died right after): the driver rebuilds the model from the last checkpoint and settles the run."""
    spec = SweepSpec.from_yaml(textwrap.dedent("""
        name: tp-test-epilogue
        base: {dataset: xor, rule: dtp, hidden: [8], epochs: 3, batch_size: 50, subset: 600, diag_size: 100}
        search: {method: grid, seeds: [0]}
    """))
    uri = sqlite_store(tmp_path, spec)
    epilogue_marker.write_text("armed")
    try:
        result = run_sweep(spec, uri, str(tmp_path / "tune"), num_cpus=2)
    finally:
        epilogue_marker.unlink()
    assert "logged it from the trial's last checkpoint" in capsys.readouterr().err  # the driver did it
    assert result.state == "succeeded" and result.trial_status == {"completed": 1}
    c = MlflowClient(uri)
    (run,) = children(c, result.experiment_id, result.parent_run_id)
    assert run.data.tags[tracking.TAG_STATUS] == "completed" and run.info.status == "FINISHED"
    assert len(ready_models(result.experiment_id, run.info.run_id)) == 1
    assert run.data.metrics["final/epochs"] == 3
    # The rebuilt model is the trained one: its predictions are the fresh run's.
    from tp_engine.data import load_dataset
    from tp_engine.train import train

    x = load_dataset("xor", seed=0, subset=600).x_test[:50]
    expected = train(spec.trial_config({"seed": 0})).model.predict(x)
    got = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(x)
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_a_kept_dataset_is_shared_read_only():
    """A process's trials share the arrays it loaded once (no per-trial copy), and none can write
    into them: the write fails instead of reaching the next trial's data."""
    from tp_engine.config import TrialConfig
    from worker.trainable import DATA_ARRAYS, trial_dataset

    cfg = TrialConfig(rule="bp", dataset="spiral", hidden=[4], subset=200, seed=7)
    first, second = trial_dataset(cfg), trial_dataset(cfg)
    for k in DATA_ARRAYS:
        a, b = getattr(first, k), getattr(second, k)
        assert np.shares_memory(a, b), k
        assert not a.flags.writeable, k
    before = second.x_train.copy()
    with pytest.raises(ValueError, match="read-only"):
        first.x_train[0, 0] = 1e6
    with pytest.raises(ValueError, match="read-only"):
        first.y_train += 1
    np.testing.assert_array_equal(trial_dataset(cfg).x_train, before)
    other = trial_dataset(cfg.model_copy(update={"seed": 8}))
    assert not np.shares_memory(other.x_train, first.x_train)


def test_trial_timer_slots_and_overhead():
    timer = TrialTimer(slots=2, cpus_per_trial=1, start=100.0)
    timer.started("a"), timer.started("b")
    timer.result("a", 10.0), timer.result("b", 4.0), timer.result("b", 4.0)
    timer.ended("b", now=110.0)  # b: 10 s in its slot, 8 of them epochs
    timer.started("c")  # takes b's slot, free since 110
    timer.ended("a", now=112.0)  # a: 12 s, 10 of epochs
    timer.result("c", 5.0), timer.result("c", None)
    timer.ended("c", now=116.5)
    s = timer.summary(end=117.0)
    by = {seg["trial_id"]: seg for seg in timer.segments}
    assert by["a"]["overhead_s"] == pytest.approx(2.0) and by["b"]["overhead_s"] == pytest.approx(2.0)
    assert by["c"]["span_s"] == pytest.approx(6.5) and by["c"]["overhead_s"] == pytest.approx(1.5)
    assert s["train_s"] == pytest.approx(23.0) and s["cores"] == 2 and s["wall_s"] == pytest.approx(17.0)
    assert s["efficiency"] == pytest.approx(23.0 / 34.0)
    assert s["trial_overhead_median_s"] == pytest.approx(2.0)


def test_sweep_timing_over_two_runs_of_a_sweep(tmp_path):
    c = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    exp = tracking.experiment_id(c, "timing")
    parent = tracking.parent_run(c, exp, "sw-0000000000aa", "name: timing\n")
    assert sweep_timing(c, parent) is None  # a sweep from before the figures
    log_timing(c, parent, {"wall_s": 100.0, "cores": 2, "train_s": 180.0, "efficiency": 0.9,
                           "trial_overhead_median_s": 1.0, "trial_overhead_s": [1.0, 0.5, 3.0]})
    log_timing(c, parent, {"wall_s": 50.0, "cores": 2, "train_s": 70.0, "efficiency": 0.7,
                           "trial_overhead_median_s": 2.0, "trial_overhead_s": [2.0, 4.0]})
    t = sweep_timing(c, parent)
    assert t["runs"] == 2 and t["trials_timed"] == 5 and t["wall_s"] == 150.0
    assert t["efficiency"] == pytest.approx(250.0 / 300.0)
    assert t["trial_overhead_median_s"] == pytest.approx(2.0)

"""The README's main command on the embedded default, as a real process: `python -m service.submit
SPEC` starts a local Ray (listening on loopback only, read from /proc while it runs), logs to a
local MLflow store (SQLite) and keeps its queue in SQLite under $SWEEP_DATA_DIR. Also: a sweep left `failed` (its driver crashed) is retried with `--resume`, and
keeps what its first run logged; once for a sweep that never ran, once for one whose driver was
killed after a trial had finished.

Tiny sweeps (2 trials, 2-D data, 2-3 epochs): the time goes into starting Ray and MLflow.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from service.queue import SweepQueue, SweepState  # noqa: E402

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.timeout(600)

SPEC = """\
name: embedded-cli
base: {dataset: spiral, hidden: [8], epochs: 2, batch_size: 50, subset: 400, diag_size: 100}
parameters:
  rule: {distribution: values, values: [bp, dtp]}
search: {method: grid, metric: valid_accuracy, mode: max, max_concurrent_trials: 2}
failure: {max_failures: 0}
published: {source: "a figure to show beside ours", metric: test_error, values: {bp: 0.125}}
"""


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWEEP_", "RAY_", "MLFLOW_"))}
    env.update(SWEEP_DATA_DIR=str(tmp_path / "data"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               PYTHONPATH=str(REPO), COLUMNS="200")
    return env


def _submit(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.submit", *args, "--json", "--num-cpus", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=540)


def _submit_watching_sockets(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """_submit in a session of its own, which its local Ray's processes (raylet workers included)
    keep; returns also the TCP sockets they listened on, read from /proc every half second."""
    import tempfile
    import time

    from test_local_cluster import listening_sockets, processes_of

    seen: dict[tuple, tuple] = {}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "service.submit", *args, "--json", "--num-cpus", "2"],
                                cwd=REPO, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 540
            while proc.poll() is None:
                assert time.monotonic() < deadline, "the embedded sweep took too long"
                for sock in listening_sockets(processes_of(sessions={proc.pid})):
                    seen[sock[:2]] = sock
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()), seen


def test_embedded_sweep_then_retry_of_a_failed_one(tmp_path, monkeypatch, capsys):
    env = _env(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)

    r, sockets = _submit_watching_sockets(env, str(spec))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["state"] == "succeeded" and out["trial_status"] == {"completed": 2}
    # The local Ray it started listened on 127.0.0.1 only, Ray's node address included. Watched
    # while it ran: the GCS and the raylet were seen listening.
    from test_local_cluster import not_loopback

    print("\n".join(f"{a}:{p} pid {pid} {cmd[:60]}" for a, p, pid, cmd in sorted(sockets.values())))
    commands = " ".join(sock[3] for sock in sockets.values())
    assert "gcs_server" in commands and "raylet" in commands, sorted(sockets.values())
    assert not_loopback(sockets.values()) == [], sorted(sockets.values())
    # Not a terminal: progress comes as plain lines, on start and whenever a trial finishes.
    assert f"{out['sweep_id']}: 0/2 done" in r.stderr and f"{out['sweep_id']}: 2/2 done" in r.stderr
    assert {row["rule"] for row in out["table"]} == {"bp", "dtp"}
    sweep_id = out["sweep_id"]

    queue = SweepQueue(f"sqlite:///{tmp_path / 'data' / 'queue.db'}")
    rec = queue.get(sweep_id)
    assert rec.state is SweepState.SUCCEEDED and rec.attempts == 1
    assert rec.mlflow_parent_run_id == out["parent_run_id"]

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    children = c.search_runs([out["experiment_id"]],
                             f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert len(children) == 2 and all(run.info.status == "FINISHED" for run in children)
    # Each trial's run names its data (the MLflow UI's Dataset column); both trials trained on the same rows.
    inputs = [c.get_run(run.info.run_id).inputs.dataset_inputs for run in children]
    assert all(len(i) == 1 and i[0].dataset.name == "spiral" for i in inputs), inputs
    assert len({i[0].dataset.digest for i in inputs}) == 1
    assert c.get_experiment(out["experiment_id"]).tags["mlflow.experimentKind"] == "custom_model_development"
    epochs = {run.info.run_id: len(c.get_metric_history(run.info.run_id, "valid_accuracy")) for run in children}
    assert set(epochs.values()) == {2}

    # The report: the published figure beside ours, and a record to find and rerun it by.
    outdir = tmp_path / "results" / "rec"
    rep = subprocess.run([sys.executable, "-m", "service.report", sweep_id, "--outdir", str(outdir), "--markdown",
                          str(tmp_path / "results" / "rec.md"), "--json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert rep.returncode == 0, rep.stderr[-3000:]
    table = json.loads(rep.stdout)["table_markdown"]
    assert "published test error" in table and "12.50%" in table
    bp_row = next(line for line in table.splitlines() if line.startswith("| `bp`"))
    bp_test = next(row["test_mean"] for row in out["table"] if row["rule"] == "bp")
    assert f"{100 * (1 - bp_test):.2f}%" in bp_row
    rec = json.loads((outdir / "record.json").read_text())
    assert rec["mlflow"] == {"tracking_uri": env["MLFLOW_TRACKING_URI"], "experiment_name": "embedded-cli",
                             "experiment_id": out["experiment_id"], "parent_run_id": out["parent_run_id"]}
    assert sorted(t["run_id"] for t in rec["trials"]) == sorted(run.info.run_id for run in children)
    assert all(t["epochs"] == 2 and t["best_epoch"] in (1, 2) for t in rec["trials"])
    assert rec["machine"]["source"] == "the trials' machine.* tags"
    assert rec["machine"]["machines"][0]["cpus"] == str(os.cpu_count())
    assert (outdir / "spec.yaml").read_text() == SPEC and (outdir / "comparison.csv").exists()

    # Reporting with another spec: only what describes the sweep may change, not its trials.
    from service import report as report_cli

    for k in [k for k in os.environ if k.startswith(("SWEEP_", "MLFLOW_", "RAY_"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SWEEP_DATA_DIR", env["SWEEP_DATA_DIR"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    newer = tmp_path / "newer.yaml"
    newer.write_text(SPEC.replace("values: {bp: 0.125}", "values: {dtp: 0.25}"))
    capsys.readouterr()
    assert report_cli.main([sweep_id, "--spec", str(newer), "--outdir", str(tmp_path / "r2"), "--json"]) == 0
    assert "25.00%" in json.loads(capsys.readouterr().out)["table_markdown"]
    assert (tmp_path / "r2" / "spec.yaml").read_text() == newer.read_text()
    other = tmp_path / "other.yaml"
    other.write_text(SPEC.replace("epochs: 2", "epochs: 3"))
    assert report_cli.main([sweep_id, "--spec", str(other), "--outdir", str(tmp_path / "r3")]) == 2
    err = capsys.readouterr().err
    assert "differs in: base" in err and len(err.strip().splitlines()) == 1

    # --into puts the section between its markers in a host document, and only there.
    host = tmp_path / "results" / "HOST.md"
    host.write_text("# Host\nkept above\n<!-- report:embedded-cli:start -->\nold text\n"
                    "<!-- report:embedded-cli:end -->\nkept below\n")
    assert report_cli.main([sweep_id, "--outdir", str(outdir), "--into", str(host)]) == 0
    text = host.read_text()
    assert "old text" not in text and text.startswith("# Host\nkept above\n") and text.endswith("kept below\n")
    assert f"`{sweep_id}`" in text and "](rec/learning_curves.png)" in text and "## Sweep results" not in text
    host.write_text("no markers\n")
    capsys.readouterr()
    assert report_cli.main([sweep_id, "--outdir", str(outdir), "--into", str(host)]) == 2
    assert "report:embedded-cli:start" in capsys.readouterr().err and host.read_text() == "no markers\n"

    # A second sweep whose driver "crashed": queued, dispatched once, marked failed.
    failed = queue.submit("embedded-cli", SPEC)
    queue.mark(failed.id, SweepState.RUNNING)
    queue.mark(failed.id, SweepState.FAILED, error="RuntimeError: driver crashed")
    queue.close()

    r = _submit(env, "--resume", failed.id)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"retrying failed sweep {failed.id}" in r.stderr and "driver crashed" in r.stderr
    out2 = json.loads(r.stdout.strip().splitlines()[-1])
    assert out2["sweep_id"] == failed.id and out2["state"] == "succeeded"
    with SweepQueue(f"sqlite:///{tmp_path / 'data' / 'queue.db'}") as q:
        rec = q.get(failed.id)
    assert rec.state is SweepState.SUCCEEDED and rec.error is None and rec.attempts == 2
    # The first sweep's runs are untouched: same experiment, now two parents.
    parents = [run for run in c.search_runs([out["experiment_id"]]) if "mlflow.parentRunId" not in run.data.tags]
    assert {run.info.run_id for run in parents} == {out["parent_run_id"], out2["parent_run_id"]}

    # status and the refused resume below run in this process (the same environment as the
    # commands above; a process of their own adds only its start-up).
    from service import status as status_cli
    from service import submit as submit_cli

    monkeypatch.setenv("COLUMNS", env["COLUMNS"])
    capsys.readouterr()
    assert status_cli.main([failed.id]) == 0
    status = capsys.readouterr()
    attempts = next(line for line in status.out.splitlines() if "attempts" in line)
    assert attempts.split() == ["attempts", "2"]  # an embedded run has no Ray job to name
    assert "succeeded" in status.out
    # Its comparison too, read from the result.json an embedded run leaves as a service job does.
    assert "Comparison of the rules" in status.out and "…" not in status.out
    assert {line.split()[0] for line in status.out.split("Comparison of the rules")[1].splitlines()[1:]
            if line.strip()} >= {"bp", "dtp"}
    # Ray's and MLflow's own messages went to the sweep's log, not to the terminal.
    log = tmp_path / "data" / "sweeps" / failed.id / "embedded.log"
    assert "Started a local Ray instance" in log.read_text() and "Started a local Ray" not in r.stderr
    assert f"data/sweeps/{failed.id}/embedded.log" in r.stderr or str(log) in r.stderr

    # From another directory (whose default MLflow store is elsewhere) status and report still
    # find the sweep's own store.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env_elsewhere = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    r = subprocess.run([sys.executable, "-m", "service.report", sweep_id, "--outdir", str(tmp_path / "r4"), "--json"],
                       cwd=elsewhere, env=env_elsewhere, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["tracking_uri"] == env["MLFLOW_TRACKING_URI"]

    # Resuming a finished sweep is refused as bad input.
    capsys.readouterr()
    assert submit_cli.main(["--resume", sweep_id, "--json", "--num-cpus", "2"]) == 2
    assert "succeeded" in capsys.readouterr().err


PARTLY = """\
name: embedded-partly
base: {dataset: spiral, hidden: [8], epochs: 150, batch_size: 50, subset: 2000, diag_size: 100}
# Trials start longest first: dtp, then bp. Both run 150 epochs, so the second (bp, seconds of
# per-epoch reporting) is caught mid-way: it starts in the first's reused process at once, while
# the first is still logging its model.
parameters:
  rule: {distribution: values, values: [bp, dtp]}
search: {method: grid, metric: valid_accuracy, mode: max, max_concurrent_trials: 1}
"""


def _processes_with_env(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (this test's own SWEEP_DATA_DIR): the
    killed driver's Ray processes, if any outlived it."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "environ").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_retry_of_a_partly_run_failed_sweep(tmp_path):
    """The driver dies after one trial finished (SIGKILL: no cleanup, the sweep stays `running`
    in the queue until marked failed, as a crashed driver is). --resume then keeps the finished
    trial as it was and runs only the other one."""
    import signal
    import time

    from service.queue import SweepState

    env = _env(tmp_path)
    (tmp_path / "spec.yaml").write_text(PARTLY)
    marker = f"SWEEP_DATA_DIR={env['SWEEP_DATA_DIR']}"
    log = tmp_path / "first.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "service.submit", str(tmp_path / "spec.yaml"), "--json",
                                 "--num-cpus", "2"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    done_flt = "tags.`tp.kind` = 'trial' and tags.status = 'completed'"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            exp = c.get_experiment_by_name("embedded-partly")
            if exp is not None and c.search_runs([exp.experiment_id], done_flt):
                break
            time.sleep(0.25)
        assert proc.poll() is None, f"the sweep ended before it could be killed part way:\n{log.read_text()[-3000:]}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        # Anything of its local Ray that outlived it (by pid: only this test's processes).
        deadline = time.time() + 30
        while (left := _processes_with_env(marker)) and time.time() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)

    queue = SweepQueue(f"sqlite:///{tmp_path / 'data' / 'queue.db'}")
    (rec,) = queue.list()
    assert rec.state is SweepState.RUNNING  # what a killed driver leaves
    queue.mark(rec.id, SweepState.FAILED, error="RuntimeError: driver killed")
    queue.close()
    exp_id = c.get_experiment_by_name("embedded-partly").experiment_id
    finished = c.search_runs([exp_id], done_flt)
    assert len(finished) == 1, "a partly run sweep: one trial finished, the other not"
    before = finished[0]
    assert before.data.tags["rule"] == "dtp"  # the longer trial started first
    hist_before = [(m.step, m.timestamp, m.value) for m in c.get_metric_history(before.info.run_id, "valid_accuracy")]

    r = _submit(env, "--resume", rec.id)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"retrying failed sweep {rec.id}" in r.stderr and "driver killed" in r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["sweep_id"] == rec.id and out["state"] == "succeeded"
    assert out["trial_status"] == {"completed": 2}
    with SweepQueue(f"sqlite:///{tmp_path / 'data' / 'queue.db'}") as q:
        rec = q.get(rec.id)
    assert rec.state is SweepState.SUCCEEDED and rec.attempts == 2 and rec.error is None
    from tp_engine.train import train
    from worker.spec import load_spec

    runs = c.search_runs([exp_id], "tags.`tp.kind` = 'trial'")
    assert sorted(run.data.tags["rule"] for run in runs) == ["bp", "dtp"]  # one child run per trial
    for run in runs:
        assert run.data.tags["status"] == "completed" and run.info.status == "FINISHED"
        got = sorted(c.get_metric_history(run.info.run_id, "valid_accuracy"), key=lambda m: m.step)
        cfg = load_spec(PARTLY).trial_config({"rule": run.data.tags["rule"], "seed": 0})
        assert [m.step for m in got] == list(range(1, cfg.epochs + 1)), run.data.tags["rule"]  # each epoch once
        # ... with the values of the same trial trained straight through.
        straight = train(cfg).history
        assert [m.value for m in got] == [h["valid_accuracy"] for h in straight], run.data.tags["rule"]
    # The trial finished before the kill was not run again.
    kept = next(run for run in runs if run.info.run_id == before.info.run_id)
    assert [(m.step, m.timestamp, m.value) for m in c.get_metric_history(kept.info.run_id, "valid_accuracy")] == hist_before
    assert kept.info.end_time == before.info.end_time
    assert not _processes_with_env(marker)

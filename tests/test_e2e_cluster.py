"""End to end on a real local cluster: MLflow server, a Ray head + a second Ray node, the API with
its dispatcher (scripts/local_cluster up, in a temporary SWEEP_DATA_DIR on free ports).

* a sweep submitted through the CLI runs trials on both Ray nodes, logs 1 parent + N child runs
  with metrics and a loadable model, and `service.status` / `service.report` work on it;
* a sweep cancelled mid-way ends cancelled, with no trial actor left alive and its runs kept;
* the service SIGKILLed mid-sweep and restarted adopts the running job; killed again while the
  job is stopped from outside, it resubmits the sweep on restart, which resumes from Tune's
  storage without duplicating any MLflow child run;
* every process of the cluster listens on loopback only;
* the Ray head's process group SIGKILLed mid-sweep: `local_cluster up` cleans up and restarts
  the head and its worker node only, the sweep resumes; then the second Ray node SIGKILLed
  mid-trial: its trial is retried on the head from its checkpoint, and the sweep completes with
  one child run per trial and every epoch logged once.

Slow (minutes); trials are tiny (spiral, hidden [16], numpy backend).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "scripts" / "local_cluster"
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable

pytestmark = pytest.mark.slow

BASE_SPEC = {
    "name": "e2e",
    "description": "tests/test_e2e_cluster.py",
    "base": {"dataset": "spiral", "mode": "classification", "backend": "numpy", "hidden": [16],
             "activation": "tanh", "epochs": 3, "batch_size": 50},
    "parameters": {"rule": {"distribution": "values", "values": ["bp", "dtp"]}},
    "search": {"method": "grid", "metric": "valid_accuracy", "mode": "max", "max_concurrent_trials": 2,
               "seeds": [0, 1]},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
}


def spec_file(tmp: Path, name: str, epochs: int) -> Path:
    spec = json.loads(json.dumps(BASE_SPEC))
    spec["name"] = name
    spec["base"]["epochs"] = epochs
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class Cluster:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        mlflow, api, gcs, dash, head_agent, worker_agent = free_ports(6)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SWEEP_", "RAY_", "MLFLOW_"))}
        self.launch_env = {
            **base,
            "SWEEP_DATA_DIR": str(data_dir),
            "MLFLOW_PORT": str(mlflow),
            "SWEEP_API_PORT": str(api),
            "RAY_GCS_PORT": str(gcs),
            "RAY_DASHBOARD_PORT": str(dash),
            "LOCAL_CLUSTER_HEAD_AGENT_PORT": str(head_agent),
            "LOCAL_CLUSTER_WORKER_AGENT_PORT": str(worker_agent),
            "LOCAL_CLUSTER_RAY_TEMP_DIR": f"/tmp/tp_e2e_ray_{gcs}",
            "LOCAL_CLUSTER_TIMEOUT": "300",
        }
        self.env: dict[str, str] = {}
        self.state_dir = data_dir / "local_cluster"

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(LOCAL_CLUSTER), *args], cwd=REPO, env=self.launch_env, capture_output=True,
                              text=True, timeout=timeout)

    def up(self) -> None:
        r = self.run("up")
        if r.returncode != 0:
            raise RuntimeError(f"local_cluster up failed ({r.returncode}):\n{r.stderr[-4000:]}")
        r = self.run("env", timeout=60)
        env = {}
        for line in r.stdout.splitlines():
            if line.startswith("export "):
                k, _, v = line[len("export "):].partition("=")
                env[k] = subprocess.run(["bash", "-c", f"printf %s {v}"], capture_output=True, text=True).stdout
        self.env = {**self.launch_env, **env}

    def down(self) -> None:
        self.run("down", timeout=300)

    @property
    def service_url(self) -> str:
        return self.env["SWEEP_SERVICE_URL"]

    def service_pid(self) -> int:
        return int((self.state_dir / "pids" / "service.pid").read_text().strip())

    def kill_service(self) -> None:
        pid = self.service_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            # A zombie still answers kill(0): reaped by its parent (init) shortly.
            if Path(f"/proc/{pid}/stat").exists() and " Z " in Path(f"/proc/{pid}/stat").read_text():
                return
            time.sleep(0.2)
        raise AssertionError(f"service pid {pid} survived SIGKILL")

    def log(self, name: str, tail: int | None = 6000) -> str:
        p = self.state_dir / "logs" / f"{name}.log"
        text = p.read_text() if p.exists() else ""
        return text[-tail:] if tail else text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    data = tmp_path_factory.mktemp("e2e_data")
    c = Cluster(data)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN",
                                            "RAY_USAGE_STATS_ENABLED")}
    try:
        c.up()
        # This test process talks to the Jobs/State API too: same token settings as the service.
        os.environ.pop("RAY_AUTH_TOKEN", None)
        for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_USAGE_STATS_ENABLED"):
            if k in c.env:
                os.environ[k] = c.env[k]
        yield c
    finally:
        c.down()
        shutil.rmtree(c.launch_env["LOCAL_CLUSTER_RAY_TEMP_DIR"], ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- helpers ---------------------------------------------------------------------------------


def cli(cluster: Cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", *args], cwd=REPO, env=cluster.env, capture_output=True, text=True,
                          timeout=timeout)


def submit(cluster: Cluster, path: Path) -> str:
    """Queue a spec through the CLI in service mode (--no-wait), return the sweep id."""
    r = cli(cluster, "service.submit", str(path), "--service", cluster.service_url, "--no-wait", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out.get("id") or out["sweep_id"]


def get(cluster: Cluster, sweep_id: str) -> dict:
    r = httpx.get(f"{cluster.service_url}/sweeps/{sweep_id}", timeout=30)
    r.raise_for_status()
    return r.json()


def wait_for(cluster: Cluster, sweep_id: str, pred, timeout: float, what: str, on_poll=None) -> dict:
    deadline = time.monotonic() + timeout
    v = None
    while time.monotonic() < deadline:
        try:
            v = get(cluster, sweep_id)
        except httpx.HTTPError:
            v = None  # the service may be restarting
        if on_poll is not None:
            on_poll()
        if v is not None and pred(v):
            return v
        if v is not None and v["state"] in ("failed", "cancelled", "succeeded") and not pred(v):
            raise AssertionError(f"{sweep_id} ended {v['state']} while waiting for {what}: {v.get('error')}\n"
                                 f"service log:\n{cluster.log('service')}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; last view: {v}\nservice log:\n{cluster.log('service')}")


def jobs(cluster: Cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.env["RAY_ADDRESS"])


def trial_actors(cluster: Cluster, job_id: str, alive_only: bool = False) -> list:
    from ray.util.state import list_actors

    filters = [("class_name", "=", "ImplicitFunc"), ("job_id", "=", job_id)]
    if alive_only:
        filters.append(("state", "=", "ALIVE"))
    return list_actors(address=cluster.env["RAY_ADDRESS"], filters=filters, limit=1000,
                       raise_on_missing_output=False)


def make_job_vanish(client, sub_id: str, timeout: float = 60) -> None:
    """Delete a finished job from Ray's job table, for good. (Deleted right after a stop, a job can
    come back as FAILED, "Job supervisor actor died": Ray's job monitor, seeing the supervisor go,
    writes that status for a job it no longer finds. So: delete, and make sure it stays gone.)"""
    deadline = time.monotonic() + timeout
    gone_since = None
    while time.monotonic() < deadline:
        try:
            info = client.get_job_info(sub_id)
        except RuntimeError as e:
            assert "does not exist" in str(e), e
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since >= 8:
                return
        else:
            gone_since = None
            if info.status.is_terminal():
                client.delete_job(sub_id)
        time.sleep(1)
    raise AssertionError(f"Ray job {sub_id} would not stay deleted")


def mlflow_client(view: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(view["mlflow_tracking_uri"])


def child_runs(view: dict):
    c = mlflow_client(view)
    return c.search_runs([view["mlflow_experiment_id"]],
                         filter_string=f"tags.`mlflow.parentRunId` = '{view['mlflow_parent_run_id']}'",
                         max_results=1000)


def epochs_reported(v: dict) -> int:
    return int((v.get("progress") or {}).get("epochs_reported") or 0)


ROLES = ("mlflow", "ray-head", "ray-worker", "service")


def pid_of(cluster: Cluster, name: str) -> int:
    return int((cluster.state_dir / "pids" / f"{name}.pid").read_text().strip())


def cluster_pids(cluster: Cluster, *names: str) -> set[int]:
    """The live processes of the cluster's components `names` (all by default): what each started
    (its session), the job drivers (their environment mark) and whatever writes its output into
    the cluster's Ray temp dir."""
    from test_local_cluster import processes_of

    names = names or ROLES
    ray_dir = cluster.launch_env["LOCAL_CLUSTER_RAY_TEMP_DIR"] + "/"
    return processes_of(sessions={pid_of(cluster, n) for n in names},
                        marks={f"LOCAL_CLUSTER_PROC={n}@{cluster.state_dir}" for n in names},
                        outputs_under=ray_dir if {"ray-head", "ray-worker"} & set(names) else None)


def trial_processes(cluster: Cluster, node: str) -> dict[int, str]:
    """pid -> trial id of the Tune trial actors running on Ray node `node` (ray-head or
    ray-worker), read from their working directory (Tune's per-trial directory)."""
    from test_local_cluster import processes_of

    out = {}
    for pid in processes_of(sessions={pid_of(cluster, node)}):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if b"ImplicitFunc" in cmd and "run_trial_" in cwd:
            out[pid] = Path(cwd).name.split("_")[2] + "_" + Path(cwd).name.split("_")[3]
    return out


def check_loopback_only(cluster: Cluster) -> list:
    from test_local_cluster import listening_sockets, not_loopback

    sockets = listening_sockets(cluster_pids(cluster))
    assert not_loopback(sockets) == [], sockets
    return sockets


# ---- tests -----------------------------------------------------------------------------------


def test_health(cluster):
    h = httpx.get(cluster.service_url + "/health", timeout=30).json()
    assert h == {"status": "ok", "queue": "sqlite", "dispatcher": "running", "ray": cluster.env["RAY_ADDRESS"]}


def test_every_process_of_the_cluster_listens_on_loopback_only(cluster):
    sockets = check_loopback_only(cluster)
    ports = {port for _, port, _, _ in sockets}
    env = cluster.launch_env
    # The check saw the cluster: its fixed ports, and Ray's own (raylets, agents, workers).
    for name in ("MLFLOW_PORT", "SWEEP_API_PORT", "RAY_GCS_PORT", "RAY_DASHBOARD_PORT",
                 "LOCAL_CLUSTER_HEAD_AGENT_PORT", "LOCAL_CLUSTER_WORKER_AGENT_PORT"):
        assert int(env[name]) in ports, (name, sockets)
    assert sum("raylet" in cmd for _, _, _, cmd in sockets) >= 4, sockets  # 2 nodes, 2+ ports each


def test_sweep_runs_on_both_nodes_logs_to_mlflow_and_reports(cluster, tmp_path, capsys):
    path = spec_file(tmp_path, "e2e-smoke", epochs=3)
    # The CLI's default: submit and wait for the end (run in the background while we watch).
    waiting = subprocess.Popen([PY, "-m", "service.submit", str(path), "--service", cluster.service_url,
                                "--json"], cwd=REPO, env=cluster.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    sweep_id = None
    while sweep_id is None and time.monotonic() < deadline:
        listed = httpx.get(cluster.service_url + "/sweeps", timeout=30).json()["sweeps"]
        sweep_id = next((s["id"] for s in listed if s["name"] == "e2e-smoke"), None)
        time.sleep(0.5)
    assert sweep_id, "the submit CLI did not queue the sweep"

    nodes: set[str] = set()
    job_id: list[str] = []
    errors: list[str] = []

    def watch_nodes():
        try:
            if not job_id:
                jid = jobs(cluster).get_job_info(sweep_id).job_id  # None until the driver starts
                if jid is None:
                    return
                job_id.append(jid)
            nodes.update(a.node_id for a in trial_actors(cluster, job_id[0]) if a.node_id)
        except Exception as e:  # e.g. not submitted yet
            errors.append(repr(e)[:500])

    v = wait_for(cluster, sweep_id, lambda v: v["state"] == "succeeded", 420, "the sweep to succeed",
                 on_poll=watch_nodes)
    watch_nodes()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert sweep_id in out

    # Both Ray nodes ran trials (the trial actors' node ids; one host, two raylets).
    from ray.util.state import list_nodes

    alive_nodes = {n.node_id for n in list_nodes(address=cluster.env["RAY_ADDRESS"]) if n.state == "ALIVE"}
    assert len(alive_nodes) == 2
    assert nodes == alive_nodes, f"trials ran on {len(nodes)} node(s); errors: {errors[-3:]}"

    # The view: progress, MLflow ids, the job's result.
    assert v["attempts"] == 1 and v["n_trials"] == 4 and v["error"] is None
    assert v["progress"]["done"] == 4 and v["progress"]["total"] == 4
    assert set(v["progress"]["best"]) == {"bp", "dtp"}
    assert v["mlflow_tracking_uri"] == cluster.env["MLFLOW_TRACKING_URI"]
    assert v["result"]["state"] == "succeeded" and "| `bp` |" in v["result"]["table_markdown"]

    # MLflow: 1 parent + 4 children with metrics and a loadable model.
    c = mlflow_client(v)
    parent = c.get_run(v["mlflow_parent_run_id"])
    assert parent.data.tags["sweep_id"] == sweep_id and parent.info.status == "FINISHED"
    runs = child_runs(v)
    assert len(runs) == 4
    assert Counter(r.data.tags["rule"] for r in runs) == {"bp": 2, "dtp": 2}
    assert len({r.data.tags["trial_id"] for r in runs}) == 4
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["status"] == "completed"
        assert "final/best_valid_accuracy" in r.data.metrics
        assert len(c.get_metric_history(r.info.run_id, "valid_accuracy")) == 3
    import mlflow

    mlflow.set_tracking_uri(v["mlflow_tracking_uri"])
    model = mlflow.pyfunc.load_model(f"runs:/{runs[0].info.run_id}/model")
    x = np.random.default_rng(0).uniform(-1, 1, size=(5, 2)).astype(np.float32)
    pred = np.asarray(model.predict(x))
    assert pred.shape[0] == 5

    # The CLIs (service mode, via SWEEP_SERVICE_URL): as real processes for the JSON outputs...
    r = cli(cluster, "service.status", sweep_id, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "succeeded"
    md = tmp_path / "results" / "README_results.md"
    outdir = tmp_path / "report"
    r = cli(cluster, "service.report", sweep_id, "--markdown", str(md), "--outdir", str(outdir), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [row["rule"] for row in rep["rows"]] == ["bp", "dtp"]
    assert all(row["trials"] == 2 for row in rep["rows"])
    assert {Path(p).name for p in rep["plots"]} == {"learning_curves.png", "angle_bp.png"}
    assert all(Path(p).stat().st_size > 1000 for p in rep["plots"])
    text = md.read_text()
    assert sweep_id in text and v["mlflow_parent_run_id"] in text and "python -m service.report" in text
    assert "](../report/learning_curves.png)" in text
    rec = json.loads((outdir / "record.json").read_text())
    assert rec["mlflow"]["parent_run_id"] == v["mlflow_parent_run_id"] and len(rec["trials"]) == 4

    # ...and in-process for the human-readable ones (a new process pays seconds of imports).
    from service import report as report_cli
    from service import status as status_cli

    with pytest.MonkeyPatch.context() as mp:
        for k, val in cluster.env.items():
            if k.startswith(("SWEEP_", "MLFLOW_")):
                mp.setenv(k, val)
        mp.setenv("COLUMNS", "200")
        capsys.readouterr()
        assert status_cli.main([]) == 0
        assert sweep_id in capsys.readouterr().out
        assert status_cli.main([sweep_id]) == 0
        out = capsys.readouterr().out
        assert "succeeded" in out and v["mlflow_parent_run_id"] in out and "#/experiments/" in out
        assert report_cli.main([sweep_id, "--outdir", str(tmp_path / "report2")]) == 0
        out = capsys.readouterr().out
        assert "bp" in out and "dtp" in out and "learning_curves.png" in out


def test_cancel_mid_sweep(cluster, tmp_path):
    sweep_id = submit(cluster, spec_file(tmp_path, "e2e-cancel", epochs=400))
    wait_for(cluster, sweep_id, lambda v: v["state"] == "running" and epochs_reported(v) >= 4, 300,
             "trials to report")
    r = cli(cluster, "service.cancel", sweep_id)
    assert r.returncode == 0, r.stderr
    assert "cancel" in r.stdout
    v = wait_for(cluster, sweep_id, lambda v: v["state"] == "cancelled", 180, "the sweep to be cancelled")
    assert v["cancel_requested"] and v["finished_at"] and v["error"] is None
    info = jobs(cluster).get_job_info(sweep_id)
    assert info.status == "STOPPED"
    assert trial_actors(cluster, info.job_id, alive_only=True) == []
    assert len(trial_actors(cluster, info.job_id)) >= 2  # they did run
    # What was logged stays: the parent and the children that started, with their metrics.
    runs = child_runs(v)
    assert runs and any(r.data.metrics.get("valid_accuracy") is not None for r in runs)
    assert v["progress"]["done"] < 4
    # Idempotent.
    assert cli(cluster, "service.cancel", sweep_id).returncode == 0
    assert get(cluster, sweep_id)["state"] == "cancelled"


def test_service_killed_mid_sweep_adopts_then_resumes(cluster, tmp_path):
    epochs = 60
    sweep_id = submit(cluster, spec_file(tmp_path, "e2e-restart", epochs=epochs))
    wait_for(cluster, sweep_id, lambda v: v["state"] == "running" and epochs_reported(v) >= 2, 300,
             "trials to report")

    # 1. SIGKILL the service; its Ray job runs on. After a restart the dispatcher adopts it.
    cluster.kill_service()
    cluster.up()
    v = get(cluster, sweep_id)
    assert v["attempts"] == 1 and v["state"] == "running", \
        f"{v['state']}: the sweep must outlast a service restart; give it more epochs"
    client = jobs(cluster)
    assert client.get_job_status(sweep_id) == "RUNNING"

    # 2. SIGKILL it again, and while the service is down make its job vanish, as a restarted
    # cluster would (stop it: Tune saves its state on SIGINT; then delete it from Ray's job table).
    # On restart the dispatcher finds no such job and resubmits the sweep as <id>-r2: it resumes
    # from Tune's storage, finished trials stay finished, and MLflow child runs are reused.
    # (A job left STOPPED without a cancel request takes the same resubmit path.)
    cluster.kill_service()
    client.stop_job(sweep_id)
    deadline = time.monotonic() + 120
    while not client.get_job_status(sweep_id).is_terminal():
        assert time.monotonic() < deadline, "the Ray job did not stop"
        time.sleep(1)
    assert client.get_job_status(sweep_id) == "STOPPED"
    make_job_vanish(client, sweep_id)
    cluster.up()
    v = wait_for(cluster, sweep_id, lambda v: v["state"] == "succeeded", 420, "the resumed sweep to succeed")
    assert f"Ray job {sweep_id} does not exist" in cluster.log("service", tail=None)
    assert v["attempts"] == 2
    assert client.get_job_status(f"{sweep_id}-r2") == "SUCCEEDED"
    assert v["progress"]["done"] == 4 and v["result"]["state"] == "succeeded"

    # Every trial has exactly one child run (the resumed job found the existing ones by tag),
    # with every epoch logged.
    runs = child_runs(v)
    per_trial = Counter(r.data.tags["trial_id"] for r in runs)
    assert len(per_trial) == 4 and set(per_trial.values()) == {1}, per_trial
    c = mlflow_client(v)
    for r in runs:
        assert r.data.tags["status"] == "completed"
        # A list, not a set: an epoch logged twice (rerun after the resume and logged again) fails.
        steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "valid_accuracy"))
        assert steps == list(range(1, epochs + 1)), steps


def test_head_then_worker_node_killed_mid_sweep(cluster, tmp_path):
    """The Ray head's process group SIGKILLed mid-sweep, then (once the sweep resumed) every process
    of the second Ray node. Last in this module: it restarts the cluster's Ray."""
    # Long enough to outlast a head restart on a quiet machine. Trials start longest first, so
    # the dtp trials are the ones part done when the head dies, and little work is left after
    # the resume: 40 epochs let the resumed sweep finish before a trial was seen on the second node.
    epochs = 80
    spec = yaml.safe_load(spec_file(tmp_path, "e2e-faults", epochs=epochs).read_text())
    spec["failure"] = {"max_failures": 2}
    path = tmp_path / "e2e-faults.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    sweep_id = submit(cluster, path)
    wait_for(cluster, sweep_id, lambda v: v["state"] == "running" and epochs_reported(v) >= 3, 300,
             "trials to report")
    timings = {}

    # 1. The head. `up` finds it dead, stops what it left (the job driver, trial processes) and
    # the worker node that belonged to it, clears its Ray session, restarts both; MLflow and the
    # service are left alone.
    before = {n: pid_of(cluster, n) for n in ROLES}
    os.killpg(before["ray-head"], signal.SIGKILL)
    t0 = time.monotonic()
    timings["head: up"] = timed_up(cluster)
    after = {n: pid_of(cluster, n) for n in ROLES}
    assert {n for n in ROLES if after[n] != before[n]} == {"ray-head", "ray-worker"}, (before, after)
    # Nothing of the old head or the old worker node is left.
    assert not cluster_pids_of_sessions({before["ray-head"], before["ray-worker"]})
    check_loopback_only(cluster)
    wait_for(cluster, sweep_id, lambda v: v["attempts"] >= 2 and v["state"] == "running"
             and trial_processes(cluster, "ray-worker"), 300, "the sweep to resume on both nodes")
    timings["head: resumed"] = time.monotonic() - t0

    # 2. The second node, mid-trial: its trial is retried on the head from its last checkpoint
    # (failure.max_failures), while the node is down.
    victim_procs = trial_processes(cluster, "ray-worker")  # pid -> trial
    victims = set(victim_procs.values())
    assert victims, "no trial on the second node any more: give the trials more epochs"
    head_trials = trial_processes(cluster, "ray-head")  # pid -> trial, every head trial process seen
    worker = pid_of(cluster, "ray-worker")
    # A lost machine takes all its processes at once: the raylet's process group, and the trial
    # processes of the node's session, which sit in process groups of their own (killed with the
    # group alone, a trial process went on reporting, even finishing its trial, after the kill).
    os.killpg(worker, signal.SIGKILL)
    for pid in cluster_pids_of_sessions({worker}):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    t1 = time.monotonic()
    kill_time = time.time()
    # A victim resumed from its checkpoint can finish its last epochs between two polls, so the
    # sweep may end first; then its results after the kill must have come from a head process.
    wait_for(cluster, sweep_id, lambda v: victims <= set(head_trials.values()) or v["state"] == "succeeded", 300,
             f"trial(s) {victims} to be retried on the head",
             on_poll=lambda: head_trials.update(trial_processes(cluster, "ray-head")))
    timings["worker: retried on head"] = time.monotonic() - t1
    # `up` restarts that node only (meanwhile the sweep goes on).
    before = {n: pid_of(cluster, n) for n in ROLES}
    t2 = time.monotonic()
    up = subprocess.Popen([str(LOCAL_CLUSTER), "up"], cwd=REPO, env=cluster.launch_env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    # Every trial process until the end: a victim's retry may move to another process (Tune
    # retries it again if its first retry fails) after the wait above ended.
    restarted_worker_trials: dict[int, str] = {}

    def record() -> None:
        head_trials.update(trial_processes(cluster, "ray-head"))
        with contextlib.suppress(Exception):  # the node may be down or starting
            restarted_worker_trials.update(trial_processes(cluster, "ray-worker"))

    try:
        v = wait_for(cluster, sweep_id, lambda v: v["state"] == "succeeded", 600, "the sweep to succeed",
                     on_poll=record)
        timings["worker: sweep done"] = time.monotonic() - t2
        _, err = up.communicate(timeout=600)
    finally:
        if up.poll() is None:
            up.kill()
    timings["worker: up"] = time.monotonic() - t2
    print(f"local_cluster up:\n{err}", flush=True)
    assert up.returncode == 0, err[-4000:]
    after = {n: pid_of(cluster, n) for n in ROLES}
    assert {n for n in ROLES if after[n] != before[n]} == {"ray-worker"}, (before, after)
    print(f"{sweep_id}: attempts {v['attempts']}, timings (s): "
          + ", ".join(f"{k} {s:.0f}" for k, s in timings.items()))
    assert v["progress"]["done"] == 4 and v["progress"]["errored"] == 0

    # One child run per trial, every epoch logged exactly once.
    runs = child_runs(v)
    per_trial = Counter(r.data.tags["trial_id"] for r in runs)
    assert len(per_trial) == 4 and set(per_trial.values()) == {1}, per_trial
    c = mlflow_client(v)
    for r in runs:
        assert r.data.tags["status"] == "completed" and r.info.status == "FINISHED"
        steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "valid_accuracy"))
        assert steps == list(range(1, epochs + 1)), (r.data.tags["trial_id"], steps)
    # Retried trials went on from a checkpoint: no trial reported an epoch twice to Tune either.
    # (result.json may hold only what came after the head's restart: the driver's staging copy of
    # the earlier lines went with the dead head's session, so it is not checked for completeness;
    # MLflow's histories above are.)
    results = list((Path(cluster.data_dir) / "tune" / sweep_id).glob("run_trial_*/result.json"))
    assert len(results) == 4, results
    for result in results:
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        trial = "_".join(result.parent.name.split("_")[2:4])
        reported = Counter(row.get("epoch") for row in rows)
        assert reported, result.parent.name
        for epoch, n in reported.items():
            if n == 1:
                continue
            # The one exception: an epoch the victim's own process reported as its node died, whose
            # checkpoint Tune had not registered; the retry trains it again from the one before.
            # (MLflow, checked above, still has it once.)
            by = [row["pid"] for row in rows if row.get("epoch") == epoch]
            assert trial in victims and n == 2 and set(by) & set(victim_procs), (result.parent.name, epoch, by)
        if trial in victims:
            # It went on on the head while the node was down (then, if retried again, on the head
            # or the restarted node).
            after_kill = [row["pid"] for row in rows if row["timestamp"] > kill_time]
            assert after_kill and set(after_kill) & set(head_trials), (trial, after_kill, head_trials)
            assert set(after_kill) <= set(head_trials) | set(restarted_worker_trials), (
                trial, after_kill, head_trials, restarted_worker_trials, victim_procs)


def timed_up(cluster: Cluster) -> float:
    """`local_cluster up` (the cluster's settings are the same after it): its duration, and what
    it said, for the record."""
    t0 = time.monotonic()
    r = cluster.run("up")
    took = time.monotonic() - t0
    print(f"local_cluster up ({took:.0f} s):\n{r.stderr}", flush=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return took


def cluster_pids_of_sessions(sessions: set[int]) -> set[int]:
    from test_local_cluster import processes_of

    return processes_of(sessions=sessions)

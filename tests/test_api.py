"""The sweep API over a real queue (SQLite in tmp_path, and PostgreSQL once), dispatcher off.

No Ray here: tests/test_e2e_cluster.py runs the dispatcher against a real cluster. PostgreSQL comes
from $TEST_POSTGRES_URL, or else scripts/postgres.sh starts a throwaway server (stopped at the end
if this module started it).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg
import pytest
import sqlalchemy as sa
import yaml
from fastapi.testclient import TestClient

from service.api import ServerThread, create_app, is_loopback
from service.client import ServiceError, SweepClient
from service.queue import SweepQueue, SweepState
from service.settings import Settings
from worker.spec import SweepSpec

REPO = Path(__file__).resolve().parents[1]
PG_SCRIPT = REPO / "scripts" / "postgres.sh"
SMOKE = (REPO / "configs" / "smoke.yaml").read_text()
YAML = {"Content-Type": "application/x-yaml"}
B = "name: t\nbase: {dataset: spiral, epochs: 2}\n"

# (id, body, content type, a path the 422 must name)
BAD_SPECS = [
    ("missing_name", "base: {dataset: spiral}\n", "application/x-yaml", "name"),
    ("empty", "", "application/x-yaml", "<document>"),
    ("yaml_syntax", "name: [unclosed\n", "text/yaml", "<document>"),
    ("not_a_mapping", "- a\n- b\n", "text/plain", "<document>"),
    ("unknown_top_key", B + "foo: 1\n", "application/x-yaml", "foo"),
    ("unknown_base_field", "name: t\nbase: {datset: spiral}\n", "application/x-yaml", "base.datset"),
    ("bad_base_value", "name: t\nbase: {epochs: -1}\n", "application/x-yaml", "base.epochs"),
    ("unknown_parameter", B + "parameters: {optimizer.lrr: {distribution: values, values: [0.1]}}\n",
     "application/x-yaml", "parameters.optimizer.lrr"),
    ("unknown_distribution", B + "parameters: {optimizer.lr: {distribution: normal, min: 0.1, max: 0.2}}\n",
     "application/x-yaml", "parameters.optimizer.lr.distribution"),
    ("loguniform_min_zero", B + "parameters: {optimizer.lr: {distribution: loguniform, min: 0, max: 0.1}}\n",
     "application/x-yaml", "parameters.optimizer.lr.min"),
    ("min_not_below_max", B + "parameters: {optimizer.lr: {distribution: uniform, min: 0.2, max: 0.1}}\n",
     "application/x-yaml", "parameters.optimizer.lr.min"),
    ("bad_rule_value", B + "parameters: {rule: {distribution: values, values: [bp, zz]}}\n",
     "application/x-yaml", "parameters.rule.values[1]"),
    ("duplicate_seed", B + "search: {seeds: [1, 1]}\n", "application/x-yaml", "search.seeds[1]"),
    ("bad_mode", B + "search: {mode: up}\n", "application/x-yaml", "search.mode"),
    ("optuna_with_grid", B + "parameters: {rule: {distribution: values, values: [bp, dtp]}}\n"
     "search: {method: optuna}\n", "application/x-yaml", "parameters.rule.distribution"),
    ("seeds_and_repeats", B + "search: {seeds: [0], repeats: 2}\n", "application/x-yaml", "search.repeats"),
    ("seed_in_base", "name: t\nbase: {seed: 3}\n", "application/x-yaml", "base.seed"),
    ("fractional_cpus", B + "resources: {cpus_per_trial: 1.5}\n", "application/x-yaml",
     "resources.cpus_per_trial"),
    ("yaml_alias", "name: &a t\nbase: {dataset: spiral}\ndescription: *a\n", "application/x-yaml", "<document>"),
    ("duplicate_key", "name: t\nname: u\n", "application/x-yaml", "<document>"),
    ("priority_not_int", B + "priority: high\n", "application/x-yaml", "priority"),
    ("grace_over_max_t", B + "early_stop: {enabled: true, grace_period: 5}\n", "application/x-yaml",
     "early_stop.grace_period"),
    ("float_range_on_int", B + "parameters: {epochs: {distribution: uniform, min: 1, max: 3}}\n",
     "application/x-yaml", "parameters.epochs.distribution"),
    ("fixed_value_as_param", B + "parameters: {optimizer.lr: 0.1}\n", "application/x-yaml",
     "parameters.optimizer.lr"),
    ("json_syntax", '{"name": "t",', "application/json", "<document>"),
    ("json_array", '["name", "t"]', "application/json", "<document>"),
    ("json_unknown_base_field", json.dumps({"name": "t", "base": {"hiden": [16]}}), "application/json",
     "base.hiden"),
    ("json_bad_seed", json.dumps({"name": "t", "search": {"seeds": [-1]}}), "application/json",
     "search.seeds[0]"),
    ("not_utf8", b"name: \xff\xfe\n", "application/x-yaml", "<document>"),
    ("nul_byte", "name: a\x00b\n", "application/x-yaml", "<document>"),
    ("control_char", "name: t\nbase: {dataset: \x07}\n", "application/x-yaml", "<document>"),
]


def make_settings(tmp_path: Path, db_url: str | None = None, token: str | None = None) -> Settings:
    return Settings(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        ray_address=None,
        service_url=None,
        data_dir=tmp_path,
        db_url=db_url or f"sqlite:///{tmp_path / 'queue.db'}",
        api_token=token,
        api_host="127.0.0.1",
        api_port=0,
        max_concurrent=1,
    )


@pytest.fixture
def queue(tmp_path):
    q = SweepQueue(f"sqlite:///{tmp_path / 'queue.db'}")
    yield q
    q.close()


@pytest.fixture
def client(tmp_path, queue):
    app = create_app(make_settings(tmp_path), queue=queue, dispatcher=False)
    with TestClient(app) as c:
        yield c


def post_yaml(c, text: str | bytes, **params):
    return c.post("/sweeps", content=text, headers=YAML, params=params)


# ---- submit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["application/x-yaml", "text/yaml", "text/plain", "text/yaml; charset=utf-8"])
def test_post_yaml_queues_the_spec_as_sent(client, queue, ctype):
    r = client.post("/sweeps", content=SMOKE, headers={"Content-Type": ctype})
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["state"] == "queued" and v["name"] == "tp-smoke-spiral"
    assert v["priority"] == 10  # from the spec
    assert v["n_trials"] == 8 and v["attempts"] == 0 and v["cancel_requested"] is False
    assert v["progress"] == {} and v["result"] is None and v["error"] is None
    assert set(v) == {"id", "name", "state", "priority", "created_at", "started_at", "finished_at", "attempts",
                      "cancel_requested", "progress", "n_trials", "mlflow_tracking_uri", "mlflow_experiment_id",
                      "mlflow_parent_run_id", "error", "result"}
    rec = queue.get(v["id"])
    assert rec.spec_yaml == SMOKE  # comments and all: what the worker will read
    assert rec.state is SweepState.QUEUED


def test_post_json_object(client, queue):
    data = yaml.safe_load(SMOKE)
    r = client.post("/sweeps", json=data)
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["n_trials"] == 8 and v["priority"] == 10
    stored = SweepSpec.from_yaml(queue.get(v["id"]).spec_yaml)
    assert stored == SweepSpec.from_dict(data)


def test_no_content_type_is_read_as_yaml(client):
    r = client.post("/sweeps", content=SMOKE.encode())
    assert r.status_code == 201, r.text


def test_unsupported_content_type(client, queue):
    r = client.post("/sweeps", content=SMOKE, headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 415
    assert queue.list() == []


def test_priority_query_overrides_the_spec(client, queue):
    r = post_yaml(client, SMOKE, priority=99)
    assert r.status_code == 201 and r.json()["priority"] == 99
    assert queue.get(r.json()["id"]).priority == 99
    r = post_yaml(client, SMOKE, priority=-3)
    assert r.json()["priority"] == -3


@pytest.mark.parametrize("bad", ["high", "1.5", "99999999999"])
def test_bad_priority_query_is_422(client, queue, bad):
    r = post_yaml(client, SMOKE, priority=bad)
    assert r.status_code == 422
    assert [d["path"] for d in r.json()["detail"]] == ["priority"]
    assert queue.list() == []


@pytest.mark.parametrize("case", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_422_with_the_field_path(client, queue, case):
    _, body, ctype, path = case
    r = client.post("/sweeps", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    assert all(set(d) == {"path", "reason"} and d["reason"] for d in detail)
    assert path in [d["path"] for d in detail], detail
    assert queue.list(limit=1000) == []


def test_several_errors_are_all_reported(client):
    body = "name: t\nbase: {datset: spiral, epochs: 0}\nsearch: {mode: up}\n"
    r = post_yaml(client, body)
    assert r.status_code == 422
    paths = {d["path"] for d in r.json()["detail"]}
    assert {"base.datset", "base.epochs"} <= paths or {"search.mode"} <= paths


def test_body_over_1_mib_is_413(client, queue):
    big = SMOKE + "\n# " + "x" * (1 << 20) + "\n"
    r = post_yaml(client, big)
    assert r.status_code == 413
    assert "1 MiB" in r.json()["detail"]

    def chunks():  # no Content-Length: the cap holds while streaming too
        yield SMOKE.encode()
        for _ in range(20):
            yield b"# " + b"y" * 65536 + b"\n"

    r = client.post("/sweeps", content=chunks(), headers=YAML)
    assert r.status_code == 413
    assert queue.list() == []


# ---- read ------------------------------------------------------------------------------------


def test_list_and_detail(client):
    ids = [post_yaml(client, SMOKE, priority=p).json()["id"] for p in (0, 5, 0)]
    r = client.get("/sweeps")
    assert r.status_code == 200
    assert [s["id"] for s in r.json()["sweeps"]] == ids[::-1]  # newest first
    r = client.get("/sweeps", params={"state": "queued"})
    assert [s["id"] for s in r.json()["sweeps"]] == [ids[1], ids[0], ids[2]]  # dispatch order
    assert len(client.get("/sweeps", params={"limit": 2}).json()["sweeps"]) == 2
    assert client.get("/sweeps", params={"state": "running"}).json() == {"sweeps": []}

    one = client.get(f"/sweeps/{ids[1]}")
    assert one.status_code == 200 and one.json()["id"] == ids[1] and one.json()["priority"] == 5
    spec = client.get(f"/sweeps/{ids[1]}/spec")
    assert spec.status_code == 200 and spec.text == SMOKE


def test_unknown_sweep_is_404(client):
    for method, path in [("GET", "/sweeps/sw-000000000000"), ("GET", "/sweeps/sw-000000000000/spec"),
                         ("POST", "/sweeps/sw-000000000000/cancel")]:
        r = client.request(method, path)
        assert r.status_code == 404, path
        assert isinstance(r.json()["detail"], str) and "sw-000000000000" in r.json()["detail"]


@pytest.mark.parametrize("params,path", [({"state": "bogus"}, "state"), ({"limit": 0}, "limit"),
                                         ({"limit": "x"}, "limit"), ({"limit": 100000}, "limit")])
def test_bad_list_query_is_422(client, params, path):
    r = client.get("/sweeps", params=params)
    assert r.status_code == 422
    assert [d["path"] for d in r.json()["detail"]] == [path]


def test_view_shows_progress_mlflow_ids_and_result(tmp_path, client, queue):
    sid = post_yaml(client, SMOKE).json()["id"]
    assert queue.claim_next().id == sid
    progress = {"total": 8, "done": 3, "running": 2, "pending": 3, "errored": 0, "best": {"bp": 0.9}}
    queue.update(sid, progress=progress, mlflow_experiment_id="7", mlflow_parent_run_id="abc")
    folder = tmp_path / "sweeps" / sid
    folder.mkdir(parents=True)
    (folder / "started.json").write_text(json.dumps({"experiment_id": "7", "parent_run_id": "abc",
                                                     "tracking_uri": "http://127.0.0.1:5999"}))
    result = {"state": "succeeded", "trial_status": {"completed": 8}, "table_markdown": "| rule |\n"}
    (folder / "result.json").write_text(json.dumps(result))
    v = client.get(f"/sweeps/{sid}").json()
    assert v["state"] == "running" and v["progress"] == progress and v["started_at"] and v["attempts"] == 1
    assert (v["mlflow_experiment_id"], v["mlflow_parent_run_id"]) == ("7", "abc")
    assert v["mlflow_tracking_uri"] == "http://127.0.0.1:5999"  # the one the job used
    assert v["result"] is None  # only once finished
    queue.mark(sid, SweepState.SUCCEEDED)
    v = client.get(f"/sweeps/{sid}").json()
    assert v["state"] == "succeeded" and v["finished_at"] and v["result"] == result


# ---- cancel ----------------------------------------------------------------------------------


def test_cancel_queued_is_immediate_and_idempotent(client, queue):
    sid = post_yaml(client, SMOKE).json()["id"]
    r = client.post(f"/sweeps/{sid}/cancel")
    assert r.status_code == 200
    v = r.json()
    assert v["state"] == "cancelled" and v["cancel_requested"] is True and v["finished_at"]
    again = client.post(f"/sweeps/{sid}/cancel").json()
    assert again == v
    assert queue.claim_next() is None


def test_cancel_running_requests_it(client, queue):
    sid = post_yaml(client, SMOKE).json()["id"]
    queue.claim_next()
    v = client.post(f"/sweeps/{sid}/cancel").json()
    assert v["state"] == "running" and v["cancel_requested"] is True
    queue.mark(sid, SweepState.CANCELLED)
    assert client.post(f"/sweeps/{sid}/cancel").json()["state"] == "cancelled"


def test_cancel_finished_leaves_it(client, queue):
    sid = post_yaml(client, SMOKE).json()["id"]
    queue.claim_next()
    queue.mark(sid, SweepState.SUCCEEDED)
    v = client.post(f"/sweeps/{sid}/cancel").json()
    assert v["state"] == "succeeded" and v["cancel_requested"] is False


def test_retry_puts_a_failed_sweep_back_in_line(client, queue):
    sid = post_yaml(client, SMOKE).json()["id"]
    queue.claim_next()
    queue.mark(sid, SweepState.FAILED, error="driver crashed")
    r = client.post(f"/sweeps/{sid}/retry")
    assert r.status_code == 200
    v = r.json()
    assert v["state"] == "queued" and v["error"] is None and v["finished_at"] is None
    assert queue.claim_next().id == sid  # the dispatcher's next pick
    r = client.post(f"/sweeps/{sid}/retry")  # running now
    assert r.status_code == 409 and "only a failed sweep" in r.json()["detail"]
    assert queue.get(sid).state is SweepState.RUNNING
    assert client.post("/sweeps/sw-nope/retry").status_code == 404


# ---- bursts ----------------------------------------------------------------------------------


def test_burst_of_200_sequential_submissions_keeps_order(client, queue):
    ids = []
    for i in range(200):
        r = post_yaml(client, SMOKE.replace("name: tp-smoke-spiral", f"name: burst-{i}"))
        assert r.status_code == 201
        ids.append(r.json()["id"])
    assert len(set(ids)) == 200
    queued = client.get("/sweeps", params={"state": "queued", "limit": 1000}).json()["sweeps"]
    assert [s["id"] for s in queued] == ids  # same priority: FIFO
    assert [s["name"] for s in queued] == [f"burst-{i}" for i in range(200)]
    assert [queue.claim_next(max_running=1000).id for _ in range(200)] == ids


def test_burst_of_200_concurrent_submissions_loses_none(tmp_path, queue):
    app = create_app(make_settings(tmp_path), queue=queue, dispatcher=False)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        def submit(i: int) -> str:
            r = http.post("/sweeps", content=SMOKE.replace("tp-smoke-spiral", f"c-{i}"), headers=YAML)
            assert r.status_code == 201, r.text
            return r.json()["id"]

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(submit, range(200)))
        listed = http.get("/sweeps", params={"state": "queued", "limit": 1000}).json()["sweeps"]
    assert len(set(ids)) == 200
    assert sorted(s["id"] for s in listed) == sorted(ids)
    assert sorted(s["name"] for s in listed) == sorted(f"c-{i}" for i in range(200))
    seqs = [queue.get(i).seq for i in ids]
    assert len(set(seqs)) == 200


# ---- auth ------------------------------------------------------------------------------------


def test_token_auth(tmp_path, queue):
    token = "s3cret-" + uuid.uuid4().hex
    app = create_app(make_settings(tmp_path, token=token), queue=queue, dispatcher=False)
    with TestClient(app) as c:
        good = {"Authorization": f"Bearer {token}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"},
                        {"Authorization": f"Bearer {token}x"}, {"Authorization": token}):
            for method, path in [("GET", "/sweeps"), ("POST", "/sweeps"), ("GET", "/sweeps/sw-x"),
                                 ("POST", "/sweeps/sw-x/cancel"), ("GET", "/sweeps/sw-x/spec")]:
                r = c.request(method, path, headers={**headers, **YAML}, content=SMOKE if method == "POST" else None)
                assert r.status_code == 401, (headers, path)
                assert r.headers["www-authenticate"] == "Bearer"
        assert queue.list() == []
        r = c.post("/sweeps", content=SMOKE, headers={**good, **YAML})
        assert r.status_code == 201
        sid = r.json()["id"]
        assert c.get("/sweeps", headers=good).status_code == 200
        assert c.get(f"/sweeps/{sid}", headers=good).status_code == 200
        assert c.post(f"/sweeps/{sid}/cancel", headers=good).json()["state"] == "cancelled"
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok"


def test_health(client):
    assert client.get("/health").json() == {"status": "ok", "queue": "sqlite", "dispatcher": "stopped",
                                            "ray": None}


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/sweeps", "/sweeps/{sweep_id}", "/sweeps/{sweep_id}/cancel", "/health"} <= set(paths)


# ---- the real process and the CLIs -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SWEEP_", "RAY_", "MLFLOW_"))}
    env.update(SWEEP_DATA_DIR=str(tmp_path), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def test_is_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "192.168.1.2", "example.org"))


@pytest.mark.parametrize("host", ["0.0.0.0"])  # "::" and others: test_is_loopback
def test_refuses_to_listen_beyond_loopback_without_a_token(tmp_path, host):
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "service.api", "--host", host, "--port", str(port)],
                       cwd=REPO, env=clean_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "SWEEP_API_TOKEN" in r.stderr and host in r.stderr


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"service exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("service did not answer /health")


def run_cli(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_real_process_client_and_clis(tmp_path, monkeypatch, capsys):
    """`python -m service.api` with a token, driven by SweepClient and the status/cancel/report CLIs
    (two CLI runs as real processes for their exit codes; the rest in-process via main(), because
    each new process pays for importing MLflow in settings.load())."""
    from service import cancel as cancel_cli
    from service import report as report_cli
    from service import status as status_cli

    token = uuid.uuid4().hex
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env(tmp_path, SWEEP_API_TOKEN=token, SWEEP_DB_URL=f"sqlite:///{tmp_path / 'q.db'}")
    proc = subprocess.Popen([sys.executable, "-m", "service.api", "--host", "127.0.0.1", "--port", str(port),
                             "--no-dispatcher", "--log-level", "warning"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_health(url, proc)
        with SweepClient(url, token) as c:
            assert c.health()["dispatcher"] == "stopped"
            v1 = c.submit(SMOKE)
            v2 = c.submit(yaml.safe_load(SMOKE), priority=20)
            assert v1.state == "queued" and v2.priority == 20 and v2.n_trials == 8
            assert [v.id for v in c.list(state="queued")] == [v2.id, v1.id]
            assert c.spec(v1.id) == SMOKE
            with pytest.raises(ServiceError) as e:
                c.submit("name: t\nsearch: {mode: up}\n")
            assert e.value.status == 422 and e.value.is_bad_input
            assert str(e.value).startswith("invalid spec: search.mode: ")
            with pytest.raises(ServiceError) as e:
                c.get("sw-nope")
            assert e.value.status == 404
        with SweepClient(url, "wrong") as bad, pytest.raises(ServiceError) as e:
            bad.list()
        assert e.value.status == 401 and "SWEEP_API_TOKEN" in str(e.value)

        cli_env = {**env, "SWEEP_SERVICE_URL": url}
        r = run_cli(["service.status", "--json"], cli_env)
        assert r.returncode == 0, r.stderr
        assert [s["id"] for s in json.loads(r.stdout)["sweeps"]] == [v2.id, v1.id]
        r = run_cli(["service.cancel", "sw-nope"], cli_env)
        assert r.returncode == 2 and "sw-nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1

        for k in [k for k in os.environ if k.startswith(("SWEEP_", "MLFLOW_", "RAY_"))]:
            monkeypatch.delenv(k)
        for k, v in cli_env.items():
            if k.startswith(("SWEEP_", "MLFLOW_")):
                monkeypatch.setenv(k, v)
        monkeypatch.setenv("COLUMNS", "200")

        def cli(mod, *args):
            capsys.readouterr()
            code = mod.main(list(args))
            out, err = capsys.readouterr()
            return code, out, err

        code, out, _ = cli(status_cli, v1.id, "--json")
        assert code == 0 and json.loads(out)["id"] == v1.id
        code, out, _ = cli(status_cli)
        assert code == 0 and v1.id in out and "tp-smoke-spiral" in out and "queued" in out
        code, out, _ = cli(status_cli, v1.id)
        assert code == 0 and "priority" in out and "8" in out
        code, out, _ = cli(cancel_cli, v1.id, "--json")
        assert code == 0 and json.loads(out)["state"] == "cancelled"
        code, out, _ = cli(cancel_cli, v1.id)
        assert code == 0 and "cancelled" in out
        monkeypatch.setenv("SWEEP_API_TOKEN", "wrong")
        code, _, err = cli(status_cli)
        assert code == 1 and "401" in err
        monkeypatch.setenv("SWEEP_API_TOKEN", token)

        # Retrying a failed sweep through the service: `submit --resume ID` asks the API.
        from service import submit as submit_cli

        with SweepQueue(env["SWEEP_DB_URL"]) as q:
            v3 = q.submit("to-fail", SMOKE)
            q.mark(v3.id, SweepState.RUNNING)
            q.mark(v3.id, SweepState.FAILED, error="driver crashed")
        code, out, err = cli(submit_cli, "--resume", v3.id, "--no-wait", "--json")
        assert code == 0, err
        assert json.loads(out) == {"sweep_id": v3.id, "state": "queued", "experiment_name": "to-fail"}
        assert f"retrying failed sweep {v3.id}" in err
        code, _, err = cli(submit_cli, "--resume", v3.id, "--no-wait")
        assert code == 2 and "is queued; only a failed sweep can be retried" in err

        # Embedded mode: no service URL, the same queue database read directly.
        monkeypatch.delenv("SWEEP_SERVICE_URL")
        code, out, _ = cli(status_cli, v1.id, "--json")
        assert code == 0 and json.loads(out)["state"] == "cancelled"
        code, _, err = cli(status_cli, "sw-nope")
        assert code == 2 and "sw-nope" in err
        code, _, err = cli(report_cli, v2.id)
        assert code == 1 and "no MLflow runs yet" in err
        code, out, _ = cli(cancel_cli, v2.id)
        assert code == 0 and "cancelled" in out
    finally:
        proc.terminate()
        proc.wait(30)
    code, _, err = cli(status_cli, "--service", url)
    assert code == 1 and "cannot reach" in err


# ---- the dispatcher without a cluster ---------------------------------------------------------


def test_submission_ids():
    from service.dispatcher import submission_id

    assert submission_id("sw-1", 1) == "sw-1"
    assert submission_id("sw-1", 0) == "sw-1"
    assert submission_id("sw-1", 3) == "sw-1-r3"


def test_dispatcher_changes_nothing_while_ray_is_unreachable(tmp_path, queue):
    """Nothing listens on the port: no sweep is claimed, a running one stays running, the thread
    keeps retrying and /health says so."""
    from service.dispatcher import Dispatcher, RayUnavailable

    settings = replace(make_settings(tmp_path), ray_address=f"http://127.0.0.1:{free_port()}")
    sid = queue.submit("t", SMOKE).id
    d = Dispatcher(settings, queue, poll_interval=0.1)
    with pytest.raises(RayUnavailable, match="cannot reach the Ray Jobs API"):
        d.tick()
    rec = queue.get(sid)
    assert rec.state is SweepState.QUEUED and rec.attempts == 0
    assert queue.claim_next().id == sid
    with pytest.raises(RayUnavailable):
        d.tick()
    rec = queue.get(sid)
    assert rec.state is SweepState.RUNNING and rec.attempts == 1 and rec.error is None

    app = create_app(settings, queue=queue, dispatcher=True, poll_interval=0.1)
    with TestClient(app) as c:
        time.sleep(0.5)
        assert c.get("/health").json() == {"status": "ok", "queue": "sqlite", "dispatcher": "running",
                                           "ray": settings.ray_address}
        other = post_yaml(c, SMOKE).json()["id"]
        time.sleep(0.5)
        assert queue.get(other).state is SweepState.QUEUED
    assert queue.get(sid).state is SweepState.RUNNING


# ---- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_server_url():
    url = os.environ.get("TEST_POSTGRES_URL")
    if url:
        yield url
        return
    already_running = subprocess.run([str(PG_SCRIPT), "status"], check=False).returncode == 0
    subprocess.run([str(PG_SCRIPT), "start"], check=True, timeout=300)
    url = subprocess.run([str(PG_SCRIPT), "url"], check=True, capture_output=True, text=True).stdout.strip()
    yield url
    if not already_running:
        subprocess.run([str(PG_SCRIPT), "stop"], check=False, timeout=60)


@pytest.fixture
def pg_queue_url(pg_server_url):
    dsn = sa.make_url(pg_server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    schema = f"api_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in pg_server_url else "?"
    yield f"{pg_server_url}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_api_on_postgresql(tmp_path, pg_queue_url):
    settings = make_settings(tmp_path, db_url=pg_queue_url)
    app = create_app(settings, dispatcher=False)  # the app opens (and closes) its own queue
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/health").json()["queue"] == "postgresql"
        r = http.post("/sweeps", content="name: t\nsearch: {mode: up}\n", headers=YAML)
        assert r.status_code == 422 and r.json()["detail"][0]["path"] == "search.mode"
        assert http.get("/sweeps").json() == {"sweeps": []}
        a = http.post("/sweeps", content=SMOKE, headers=YAML).json()
        b = http.post("/sweeps", json=yaml.safe_load(SMOKE), params={"priority": 50}).json()
        assert http.get(f"/sweeps/{a['id']}").json()["n_trials"] == 8

        def submit(i: int) -> str:
            r = http.post("/sweeps", content=SMOKE.replace("tp-smoke-spiral", f"pg-{i}"), headers=YAML)
            assert r.status_code == 201, r.text
            return r.json()["id"]

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(submit, range(60)))
        queued = http.get("/sweeps", params={"state": "queued", "limit": 1000}).json()["sweeps"]
        assert [s["id"] for s in queued[:2]] == [b["id"], a["id"]]
        assert sorted(s["id"] for s in queued[2:]) == sorted(ids)
        assert http.post(f"/sweeps/{a['id']}/cancel").json()["state"] == "cancelled"
        assert http.get("/sweeps", params={"state": "cancelled"}).json()["sweeps"][0]["id"] == a["id"]
        assert http.get("/sweeps/sw-nope").status_code == 404


# ---- the fast spec reader --------------------------------------------------------------------

# Documents where a YAML reader could go astray: every one must read the same through libyaml
# (service.views.spec_from_text) as through worker.spec's own PyYAML loader, or fail in both.
TRICKY_YAML = [
    "name: t\n", "name: 't'\n", 'name: "t\\x41"\n', "name: t # c\n", "%YAML 1.1\n---\nname: t\n",
    "---\nname: t\n...\n", "name: t\n---\nname: u\n", "name: |\n  a\n  b\n", "name: >-\n  a\n  b\n",
    "{name: t, base: {epochs: 2}}", "name: t\nbase:\n  epochs: 0x10\n", "name: t\nbase: {epochs: 1_0}\n",
    "name: t\nx: 1e-4\n", "name: t\nx: 1.0e+3\n", "name: t\nx: .inf\n", "name: t\nx: ~\n", "name: t\nx: yes\n",
    "name: t\nx: 2001-12-14\n", "name: t\nx: 12:30:00\n", "name: t\nx: 0o17\n", "name: t\nx: 017\n",
    "name: t\nx: !!str 1\n", "name: t\nx: !!binary aGk=\n", "name: t\nx: !custom 1\n", "name: &a t\ny: *a\n",
    "name: t\n<<: {x: 1}\n", "? name\n: t\n", "name: t\n\tx: 1\n", "name: t\nx: [1, 2,]\n", "name: t\nx: {a: 1,}\n",
    "name: t\nx: 'a''b'\n", "name: t\nx: \"\\u00e9\\U0001F600\"\n", "name: \u00e9t\u00e9 \U0001F600\n",
    "name: t\r\nbase: {epochs: 2}\r\n", "\ufeffname: t\n", "name: t\nx: \x85y\n", "name: t\u2028x: 1\n",
    "name: t\nx: a\x00b\n", "name: t\nx: \x07\n", "name: [unclosed\n", "name: t\n  bad: indent\n", "- a\n- b\n",
    "name: t\nname: u\n", "name: t\n1: x\n", "name: t\n[1]: x\n", "name: t\nnull: x\n", "name:\n", ": x\n",
    "name: t\nx: " + "[" * 200 + "]" * 200 + "\n", "name: 'unterminated\n", "name: t\nx: @reserved\n",
    "name: t\nx: `tick\n", "name: t\nx: -\n", "name: t\nx: - a\n", "name: t\nx: a: b\n", "name: t\nx: 'a\n  b'\n",
]


def _read_both(text: str):
    from service.views import _fast_loader
    from worker.spec import SpecError, _load_yaml

    try:
        canonical = ("ok", _load_yaml(text))
    except (SpecError, yaml.YAMLError) as e:  # PyYAML's reader errors escape _load_yaml as they are
        canonical = ("refused", str(e))
    loader = _fast_loader()(text)
    try:
        fast = ("ok", loader.get_single_data())
    except Exception as e:  # spec_from_text hands any of these to the canonical loader
        fast = ("refused", repr(e))
    finally:
        loader.dispose()
    return canonical, fast


@pytest.mark.parametrize("text", TRICKY_YAML, ids=range(len(TRICKY_YAML)))
def test_fast_reader_reads_what_the_spec_loader_reads(text):
    canonical, fast = _read_both(text)
    if canonical[0] == "ok":
        assert fast == canonical
    else:  # the fast reader may refuse more (its refusals go the slow way); never accept what is refused
        assert fast[0] == "refused" or fast[1] is None, (canonical, fast)


def test_fast_reader_agrees_on_generated_documents():
    import random

    rng = random.Random(7)
    scalars = [0, -1, 3.5, 1e-4, 1e300, True, False, None, "", "a b", "yes", "no", "on", "0x1f", "1e5", "~",
               "null", "2001-12-14", "12:30", "é", "#x", "a: b", "- x", "'q'", '"d"', "line\nbreak", " lead",
               "trail ", "\t", "[x]", "{y}", "&a", "*a", "!t", "%p", "@r", "`b", "|", ">", "?", ":", ",", "x" * 300]

    def value(depth: int):
        kind = rng.random()
        if depth > 3 or kind < 0.5:
            return rng.choice(scalars)
        if kind < 0.75:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {str(rng.choice(scalars)) + str(i): value(depth + 1) for i in range(rng.randint(0, 4))}

    for i in range(300):
        doc = {"name": f"t{i}", "base": value(0), "x": value(0)}
        style = rng.choice([None, "'", '"', "|", ">"])
        flow = rng.choice([None, True, False])
        text = yaml.safe_dump(doc, default_style=style, default_flow_style=flow, allow_unicode=rng.random() < 0.5,
                              width=rng.choice([20, 80, 1000]), sort_keys=False)
        canonical, fast = _read_both(text)
        assert canonical == fast and canonical[0] == "ok", text  # (1e+300 dumps as a float, reads as inf)


def test_spec_from_text_equals_from_yaml_on_every_config_and_bad_spec():
    from service.views import spec_from_text
    from worker.spec import SpecError

    texts = [p.read_text() for p in sorted((REPO / "configs").glob("*.yaml"))]
    texts += [body.decode("utf-8", "replace") if isinstance(body, bytes) else body
              for _, body, ctype, _ in BAD_SPECS if "json" not in ctype]
    for text in texts:
        try:
            want = ("ok", SweepSpec.from_yaml(text))
        except SpecError as e:
            want = ("refused", [(fe.path, fe.reason) for fe in e.errors])
        except yaml.YAMLError as e:
            want = ("raised", str(e))
        try:
            got = ("ok", spec_from_text(text))
        except SpecError as e:
            got = ("refused", [(fe.path, fe.reason) for fe in e.errors])
        except yaml.YAMLError as e:
            got = ("raised", str(e))
        assert got == want, text


def test_list_shows_every_change_and_a_retried_sweep_drops_its_old_result(client, queue, tmp_path):
    """Lists are served from the queue's and the views' caches while nothing changed; any change
    of a record, and a result written after the sweep ended, show in the next list; a retried
    sweep is listed without its old result."""
    from worker.lifecycle import SweepFolder

    spec = "name: t\nbase: {dataset: spiral, hidden: [4], epochs: 1}\n"
    a, b = (post_yaml(client, spec).json()["id"] for _ in range(2))
    listed = client.get("/sweeps").json()["sweeps"]
    assert [s["id"] for s in listed] == [b, a] and client.get("/sweeps").json()["sweeps"] == listed
    queue.update(a, progress={"done": 1})
    assert client.get("/sweeps").json()["sweeps"][1]["progress"] == {"done": 1}
    queue.mark(a, SweepState.RUNNING)
    queue.mark(a, SweepState.FAILED, error="boom")
    first = client.get("/sweeps").json()["sweeps"][1]
    assert first["state"] == "failed" and first["result"] is None  # no result.json yet
    SweepFolder(tmp_path, a).write_result({"state": "failed", "table": []})
    assert client.get("/sweeps").json()["sweeps"][1]["result"] == {"state": "failed", "table": []}
    queue.retry(a)
    again = client.get("/sweeps").json()["sweeps"][1]
    assert again["state"] == "queued" and again["result"] is None
    assert client.get(f"/sweeps/{a}").json()["result"] is None

"""The API's contract is what it does: schemathesis fuzzes the live API against its own OpenAPI
document, with every check, and finds nothing.

The API runs as users run it (``python -m service.api`` under uvicorn on 127.0.0.1, a token set,
dispatcher off, a SQLite queue in tmp_path); schemathesis runs as its CLI, in its own process. The
run is bounded: a fixed seed, 10 examples per operation for the fuzzing and stateful phases, plus the
coverage phase's boundary cases (about 1,200 requests in all, 15-60 s on the 2-core machine).

One allowance, for one operation: a body that matches the spec's JSON Schema can still be refused
with 422 by POST /sweeps, because the spec has rules JSON Schema cannot say (min < max, parameter
paths, rule and dataset names, printable names, trial counts); the document says so in the body's
description. Every other check runs with schemathesis's defaults.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.queue import SweepQueue, SweepState
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SMOKE = (REPO / "configs" / "smoke.yaml").read_text()
ST_TIMEOUT_S = 240  # a hard stop far above the usual run; the run itself is bounded by its examples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(tmp_path: Path, token: str | None = None) -> Settings:
    return Settings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", ray_address=None, service_url=None,
                    data_dir=tmp_path, db_url=f"sqlite:///{tmp_path / 'queue.db'}", api_token=token,
                    api_host="127.0.0.1", api_port=0, max_concurrent=1)


@pytest.fixture
def live_api(tmp_path):
    """(base URL, token, id of a failed sweep) of `python -m service.api` on loopback."""
    token = "tok-" + uuid.uuid4().hex
    db = tmp_path / "queue.db"
    with SweepQueue(f"sqlite:///{db}") as q:  # a failed sweep, so POST .../retry can succeed once
        failed = q.submit("failed-one", SMOKE).id
        q.claim_next()
        q.mark(failed, SweepState.FAILED, error="driver crashed")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWEEP_", "RAY_", "MLFLOW_"))}
    env.update(SWEEP_API_TOKEN=token, SWEEP_DATA_DIR=str(tmp_path), SWEEP_DB_URL=f"sqlite:///{db}",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONPATH=str(REPO))
    log = (tmp_path / "api.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "service.api", "--host", "127.0.0.1", "--port", str(port),
                             "--no-dispatcher", "--log-level", "warning"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "api.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        yield url, token, failed
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_schemathesis_finds_no_failure(tmp_path, live_api):
    url, token, failed = live_api
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'''
[[operations]]
include-operation-id = "submit_sweep"
# The spec has rules beyond its JSON Schema (see the request body's description): 422 is a valid
# answer to a schema-valid body here.
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]

[[operations]]
include-operation-id = "retry_sweep"
parameters = {{ sweep_id = "{failed}" }}
''')
    report = tmp_path / "report.json"
    # One worker: with two threads, hypothesis's lambda descriptions call ast.parse concurrently,
    # which on CPython 3.11 can raise a spurious "AST constructor recursion depth mismatch"
    # SystemError (python/cpython#106905), failing the run with every case passed.
    cmd = [str(Path(sys.executable).with_name("st")), "--no-color", "--config-file", str(config), "run",
           f"{url}/openapi.json", "--checks", "all", "-H", f"Authorization: Bearer {token}",
           "--max-examples", "10", "--seed", "1", "--workers", "1", "--request-timeout", "20",
           "--report", "json", "--report-json-path", str(report)]
    t0 = time.monotonic()
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=ST_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    out = run.stdout[-12000:] + run.stderr[-4000:]
    assert report.exists(), out
    rep = json.loads(report.read_text())
    cases = rep["test_cases"]
    print(f"schemathesis: {cases['generated']} cases, {cases['with_failures']} with failures, "
          f"{len(rep['errors'])} errors, {elapsed:.0f} s")
    assert rep["complete"] and rep["stop_reason"] == "completed", out
    assert rep["failures"] == [] and cases["with_failures"] == 0 and cases["unique_failures"] == 0, out
    assert rep["errors"] == [] and cases["errored"] == 0, out
    assert run.returncode == 0, out
    assert {p: v["status"] for p, v in rep["phases"].items() if p != "examples"} == {
        "coverage": "success", "fuzzing": "success", "stateful": "success"}, out
    assert cases["generated"] >= 500, out  # it did fuzz
    # The retry route was reached with a real failed sweep, not only 404s.
    assert not rep["warnings"]["missing_test_data"], rep["warnings"]
    assert "Traceback" not in (tmp_path / "api.log").read_text()


# ---- what the document says, read directly (fast, and names what schemathesis relies on) -------


@pytest.fixture
def doc(tmp_path):
    with TestClient(create_app(settings(tmp_path, token="t"), dispatcher=False)) as c:
        yield c.get("/openapi.json").json()


def test_every_protected_route_documents_401_and_503(doc):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            codes = set(op["responses"])
            if path == "/health":
                assert "401" not in codes and "security" not in op
                continue
            assert {"401", "503"} <= codes, (method, path)
            assert op["security"] == [{"HTTPBearer": []}]
            assert "Retry-After" in op["responses"]["503"]["headers"]
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"]


def test_422_is_the_projects_error_model_and_only_where_it_happens(doc):
    paths = doc["paths"]
    with_422 = {(m, p) for p, item in paths.items() for m, op in item.items() if "422" in op["responses"]}
    assert with_422 == {("post", "/sweeps"), ("get", "/sweeps")}
    for method, path in with_422:
        schema = paths[path][method]["responses"]["422"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/InvalidInput"}
    item = doc["components"]["schemas"]["FieldProblem"]
    assert set(item["properties"]) == {"path", "reason"} and set(item["required"]) == {"path", "reason"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert set(paths["/sweeps/{sweep_id}/retry"]["post"]["responses"]) >= {"200", "404", "409"}
    assert "413" in paths["/sweeps"]["post"]["responses"]


def test_state_is_an_enum_and_the_body_is_a_spec(doc):
    params = {p["name"]: p for p in doc["paths"]["/sweeps"]["get"]["parameters"]}
    ref = params["state"]["schema"]["anyOf"][0]["$ref"].rsplit("/", 1)[-1]
    assert doc["components"]["schemas"][ref]["enum"] == [s.value for s in SweepState]
    body = doc["paths"]["/sweeps"]["post"]["requestBody"]
    assert body["required"] is True
    for media in ("application/x-yaml", "application/json"):
        assert body["content"][media]["schema"] == {"$ref": "#/components/schemas/SweepSpec"}
    spec = doc["components"]["schemas"]["SweepSpec"]
    assert spec["type"] == "object" and "name" in spec["required"]  # so an empty body is not a spec
    assert spec["properties"]["priority"]["maximum"] == 2**31 - 1


def test_405_lists_every_method_of_the_path(tmp_path):
    with TestClient(create_app(settings(tmp_path), dispatcher=False)) as c:
        r = c.request("DELETE", "/sweeps")
        assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
        assert c.request("PUT", "/sweeps/sw-x/retry").headers["allow"] == "POST"


def test_out_of_range_numbers_are_422_not_500(tmp_path):
    body = "name: t\nbase: {dataset: spiral}\npriority: 99999999999\n"
    nasty = ("name: t\nbase: {dataset: spiral}\n"
             "parameters: {optimizer.lr: {distribution: qloguniform, min: 5.0e-324, max: 1.0, q: 5.0e-324}}\n")
    with TestClient(create_app(settings(tmp_path), dispatcher=False)) as c:
        r = c.post("/sweeps", content=body, headers={"Content-Type": "application/x-yaml"})
        assert r.status_code == 422 and r.json()["detail"][0]["path"] == "priority"
        r = c.post("/sweeps", content=nasty, headers={"Content-Type": "application/x-yaml"})
        assert r.status_code == 422, r.text
        r = c.post("/sweeps", content="[" * 5000 + "]" * 5000, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text

"""The two ways to the sweeps behind one interface (service.client.Sweeps): the HTTP client on a
real API server (loopback, dispatcher off) and the local queue database, run through the same
tests, the way the queue's tests run against both databases; then the CLIs against both.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from service import cancel as cancel_cli
from service import report as report_cli
from service import status as status_cli
from service import submit as submit_cli
from service.api import ServerThread, create_app
from service.client import LocalSweeps, ServiceError, SweepClient, Sweeps
from service.queue import SweepQueue, SweepState
from service.settings import load

REPO = Path(__file__).resolve().parents[1]
SMOKE = (REPO / "configs" / "smoke.yaml").read_text()
PRIORITY = yaml.safe_load(SMOKE).get("priority", 0)


@pytest.fixture(params=["local", "service"])
def backend(request, tmp_path, monkeypatch):
    for k in ("SWEEP_SERVICE_URL", "SWEEP_DB_URL", "RAY_ADDRESS", "SWEEP_API_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings = load()
    with SweepQueue(settings.db_url) as queue:
        if request.param == "local":
            with LocalSweeps(settings) as sweeps:
                yield SimpleNamespace(kind="local", sweeps=sweeps, queue=queue, args=[])
        else:
            with ServerThread(create_app(settings, queue=queue, dispatcher=False)) as srv, \
                    SweepClient(srv.url) as sweeps:
                yield SimpleNamespace(kind="service", sweeps=sweeps, queue=queue, args=["--service", srv.url])


def test_one_interface(backend):
    s = backend.sweeps
    assert isinstance(s, Sweeps)
    v = s.submit(SMOKE)
    assert (v.state, v.name, v.priority, v.attempts) == ("queued", "tp-smoke-spiral", PRIORITY, 0)
    assert v.n_trials and s.spec(v.id) == SMOKE and s.get(v.id) == v
    hi = s.submit({"name": "from-a-dict", "base": {"dataset": "spiral"}}, priority=PRIORITY + 5)
    assert hi.priority == PRIORITY + 5 and "from-a-dict" in s.spec(hi.id)
    assert [x.id for x in s.list("queued")] == [hi.id, v.id]  # dispatch order
    assert len(s.list(limit=1)) == 1

    with pytest.raises(ServiceError) as e:
        s.submit("name: t\nbase: {datset: spiral}\n")
    assert e.value.status == 422 and e.value.is_bad_input and "base.datset" in str(e.value)
    assert [d["path"] for d in e.value.detail] == ["base.datset"]

    with pytest.raises(ServiceError) as e:
        s.retry(v.id)
    assert e.value.status == 409 and "is queued; only a failed sweep can be retried" in str(e.value)
    backend.queue.mark(hi.id, SweepState.RUNNING)
    backend.queue.mark(hi.id, SweepState.FAILED, error="driver crashed")
    back = s.retry(hi.id)
    assert back.state == "queued" and back.error is None

    assert s.cancel(v.id).state == "cancelled" and s.cancel(v.id).state == "cancelled"
    for call in (s.get, s.spec, s.cancel, s.retry):
        with pytest.raises(ServiceError) as e:
            call("sw-000000000000")
        assert e.value.status == 404 and "sw-000000000000" in str(e.value)


def cli(capsys, module, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = module.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clis_against_both(backend, capsys, monkeypatch):
    s, a = backend.sweeps, backend.args
    v = s.submit(SMOKE, priority=8)
    code, out, _ = cli(capsys, status_cli, *a)
    assert code == 0 and v.id in out and "queued" in out
    code, out, _ = cli(capsys, status_cli, v.id, *a, "--json")
    assert code == 0 and json.loads(out)["priority"] == 8
    code, _, err = cli(capsys, status_cli, "sw-nope", *a)
    assert code == 2 and "sw-nope" in err
    code, _, err = cli(capsys, report_cli, v.id, *a)
    assert code == 1 and "no MLflow runs yet" in err

    # Retrying a failed sweep: the service puts it back in line; embedded, it also starts it in the
    # background (a detached process: recorded here instead).
    started = []
    monkeypatch.setattr(submit_cli.subprocess, "Popen", lambda argv, **kw: started.append(argv))
    failed = s.submit(SMOKE)
    for sid in (v.id, failed.id):
        backend.queue.mark(sid, SweepState.RUNNING)
    backend.queue.mark(failed.id, SweepState.FAILED, error="driver crashed")
    code, out, err = cli(capsys, submit_cli, "--resume", failed.id, "--no-wait", "--json", *a)
    assert code == 0, err
    assert json.loads(out) == {"sweep_id": failed.id, "state": "queued", "experiment_name": "tp-smoke-spiral"}
    assert f"retrying failed sweep {failed.id}" in err and s.get(failed.id).state == "queued"
    assert started == ([] if backend.kind == "service" else [[submit_cli.sys.executable, "-m", "service.submit",
                                                               "--resume", failed.id]])
    code, _, err = cli(capsys, submit_cli, "--resume", v.id, "--no-wait", *a)  # running: neither resumes it
    assert code == 2 and "is running" in err

    code, out, _ = cli(capsys, cancel_cli, failed.id, *a)
    assert code == 0 and "cancelled" in out
    code, _, err = cli(capsys, cancel_cli, "sw-nope", *a)
    assert code == 2 and "sw-nope" in err

"""Load test of the sweep API: submission and list latency.

    python bench/api_load.py [--n 200] [--concurrency 8] [--lists 200] [--db-url URL] [--out FILE]

Starts the API (embedded uvicorn in a child process, so the client threads here do not compete with
it for the GIL; ``--in-process`` runs it in a thread of this process instead; 127.0.0.1, a free
port, dispatcher off) on a fresh queue: a SQLite file in a temporary folder, or, when ``--db-url``
names a PostgreSQL server, a database created for the run on that server and dropped after it.
It fires ``n`` spec submissions (configs/smoke.yaml, renamed per request) from ``concurrency``
threads, then ``lists`` GET /sweeps calls (limit 100) from the same threads (once on a still queue,
once while a sweep's progress is rewritten every ``--churn-ms``), checks that every
submission was queued, and prints JSON (also written to ``--out``):

    {"queue": "sqlite"|"postgresql", "submit_ms": {"p50", "p90", "p99", "max", "mean"},
     "list_ms": {...}, "list_with_writes_ms": {...}, "n": 200, "concurrency": 8, "queued": 200, "submit_per_s": ...,
     "goal_p99_ms": 100, "meets_goal": ..., "server_cpu_ms_per_submit": ..., "server_cpu_ms_per_list": ...,
     "machine": {"cpus", "loadavg_start", "loadavg_end", "nice"}, ...}

``--dry-run-check`` also times ``python -m service.submit configs/sweep.yaml --dry-run`` (goal: < 1 s).
The machine's load average and this process's niceness are recorded because latency on a shared
2-core machine depends on them (``nice -n -10 python bench/api_load.py`` as root keeps neighbours from
taking the cores mid-run); the server's CPU time per request does not depend on them.

Only loopback traffic; bounded in count. Exit 1 if a request failed or a submission was lost.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from service.api import ServerThread, create_app  # noqa: E402
from service.queue import SweepQueue  # noqa: E402
from service.settings import Settings  # noqa: E402

GOAL_P99_MS = 100


def percentiles(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)

    def pct(p: float) -> float:
        return round(s[min(len(s) - 1, max(0, int(round(p / 100 * len(s))) - 1))], 2)

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": round(s[-1], 2),
            "mean": round(statistics.fmean(s), 2)}


def _settings(data: Path, db_url: str) -> Settings:
    return Settings(
        tracking_uri=f"sqlite:///{data / 'mlflow.db'}", ray_address=None, service_url=None,
        data_dir=data, db_url=db_url, api_token=None, api_host="127.0.0.1", api_port=0, max_concurrent=1,
    )


def _serve(data: str, db_url: str, port: int) -> None:
    """Child process: the API under uvicorn until terminated."""
    import uvicorn

    app = create_app(_settings(Path(data), db_url), dispatcher=False)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ChildServer:
    def __init__(self, data: Path, db_url: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = mp.get_context("spawn").Process(target=_serve, args=(str(data), db_url, self.port), daemon=True)

    def __enter__(self) -> "_ChildServer":
        self.proc.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not self.proc.is_alive():
                raise RuntimeError("the API process exited")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the API did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.join(30)

    def cpu_s(self) -> float | None:
        """CPU seconds the server process has used (Linux /proc), or None."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None


@contextlib.contextmanager
def fresh_database(db_url: str | None, data: Path):
    """A queue URL nobody else uses: a SQLite file in ``data``, or a new database on the
    PostgreSQL server that ``db_url`` names (dropped afterwards)."""
    if not db_url:
        yield f"sqlite:///{data / 'queue.db'}"
        return
    url = sa.make_url(db_url)
    if url.get_backend_name() != "postgresql":
        yield db_url
        return
    name = "api_load_" + secrets.token_hex(4)
    admin = sa.create_engine(url.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _commit() -> str | None:
    """The code measured: git HEAD, marked dirty when service/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def dry_run_seconds() -> float:
    """Wall time of ``python -m service.submit configs/sweep.yaml --dry-run`` (a fresh process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEP_SERVICE_URL", "RAY_ADDRESS")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "service.submit", "configs/sweep.yaml", "--dry-run"], cwd=REPO, env=env,
                   check=True, stdout=subprocess.DEVNULL, timeout=120)
    return round(time.perf_counter() - t0, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="submissions (default 200)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--lists", type=int, default=200, help="GET /sweeps calls after the submissions (default 200)")
    p.add_argument("--churn-ms", type=float, default=100.0,
                   help="then the same lists again while a sweep's progress is written every this many ms "
                        "(0: skip; default 100)")
    p.add_argument("--db-url", help="queue database server (default: a fresh SQLite file); a PostgreSQL URL gets "
                                    "a fresh database on that server for the run")
    p.add_argument("--in-process", action="store_true", help="serve from a thread of this process")
    p.add_argument("--dry-run-check", action="store_true", help="also time submit --dry-run")
    p.add_argument("--out", type=Path, help="also write the JSON figures to this file")
    args = p.parse_args(argv)
    if not (1 <= args.n <= 10_000 and 1 <= args.concurrency <= 64 and 0 <= args.lists <= 10_000):
        p.error("n in 1..10000, concurrency in 1..64, lists in 0..10000")

    spec = (REPO / "configs" / "smoke.yaml").read_text()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="api_load_") as tmp, fresh_database(args.db_url, Path(tmp)) as db_url:
        data = Path(tmp)
        settings = _settings(data, db_url)
        queue = SweepQueue(settings.db_url)
        if args.in_process:
            server = ServerThread(create_app(settings, queue=queue, dispatcher=False))
        else:
            server = _ChildServer(data, settings.db_url)
        local = threading.local()

        def http(base: str) -> httpx.Client:
            if not hasattr(local, "c"):
                local.c = httpx.Client(base_url=base, timeout=60)
            return local.c

        with server as srv:
            # Warm up (first request pays for imports and connection setup).
            httpx.get(srv.url + "/health", timeout=30)

            def submit(i: int) -> tuple[float, int, str]:
                body = spec.replace("name: tp-smoke-spiral", f"name: load-{i}")
                client = http(srv.url)  # made outside the timing: httpx loads its CA bundle on creation
                t0 = time.perf_counter()
                r = client.post("/sweeps", content=body, headers={"Content-Type": "application/x-yaml"})
                dt = (time.perf_counter() - t0) * 1000
                return dt, r.status_code, (r.json().get("id", "") if r.status_code == 201 else r.text[:200])

            def list_call(_: int) -> tuple[float, int, int]:
                client = http(srv.url)
                t0 = time.perf_counter()
                r = client.get("/sweeps", params={"limit": 100})
                dt = (time.perf_counter() - t0) * 1000
                return dt, r.status_code, len(r.json().get("sweeps", [])) if r.status_code == 200 else 0

            cpu = getattr(srv, "cpu_s", lambda: None)
            # This client's own full collections (it parses 100-sweep lists in 8 threads) would
            # be counted as the API's latency: its long-lived objects are set aside first.
            gc.collect()
            gc.freeze()
            with ThreadPoolExecutor(args.concurrency) as pool:
                cpu0 = cpu()
                t0 = time.perf_counter()
                subs = list(pool.map(submit, range(args.n)))
                submit_wall = time.perf_counter() - t0
                cpu1 = cpu()
                lists = list(pool.map(list_call, range(args.lists)))
                cpu2 = cpu()
                # The same lists while a sweep's progress changes every --churn-ms (a dispatcher
                # writes progress every few seconds per running sweep): lists then miss the
                # queue's list cache whenever the revision moved.
                churn_lists, churn_writes = [], 0
                if args.churn_ms > 0 and args.lists:
                    stop = threading.Event()
                    target = subs[0][2]

                    def churn() -> None:
                        nonlocal churn_writes
                        while not stop.wait(args.churn_ms / 1000):
                            queue.update(target, progress={"done": churn_writes})
                            churn_writes += 1

                    writer = threading.Thread(target=churn, daemon=True)
                    writer.start()
                    churn_lists = list(pool.map(list_call, range(args.lists)))
                    stop.set()
                    writer.join()
            queued = len(queue.list(limit=args.n + 10))
        queue.close()
    load_end = os.getloadavg()

    failed = [s for s in subs if s[1] != 201] + [x for x in lists if x[1] != 200]
    ids = {s[2] for s in subs if s[1] == 201}
    submit_ms = percentiles([s[0] for s in subs])
    list_ms = percentiles([x[0] for x in lists]) if lists else None
    failed += [x for x in churn_lists if x[1] != 200]
    slowest = sorted(range(len(subs)), key=lambda i: -subs[i][0])[:3]
    out = {
        "queue": sa.make_url(db_url).get_backend_name(),
        "submit_ms": submit_ms,
        "list_ms": list_ms,
        "list_with_writes_ms": percentiles([x[0] for x in churn_lists]) if churn_lists else None,
        "writes_during_lists": churn_writes,
        "churn_ms": args.churn_ms,
        "n": args.n,
        "concurrency": args.concurrency,
        "lists": args.lists,
        "queued": queued,
        "unique_ids": len(ids),
        "failed_requests": len(failed),
        "submit_per_s": round(args.n / submit_wall, 1),
        "slowest_submissions": [{"index": i, "ms": round(subs[i][0], 1)} for i in slowest],
        # What the server itself spent per request (independent of how busy the machine is; with one
        # GIL-bound server process, concurrency x this is the floor of a closed loop's latency).
        "server_cpu_ms_per_submit": round((cpu1 - cpu0) * 1000 / args.n, 2) if cpu0 is not None else None,
        "server_cpu_ms_per_list": (round((cpu2 - cpu1) * 1000 / args.lists, 2)
                                   if cpu0 is not None and args.lists else None),
        "server": "thread" if args.in_process else "child process",
        "goal_p99_ms": GOAL_P99_MS,
        "meets_goal": submit_ms["p99"] < GOAL_P99_MS and (list_ms is None or list_ms["p99"] < GOAL_P99_MS),
        "commit": _commit(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in load_end], "nice": os.nice(0)},
    }
    if args.dry_run_check:
        out["submit_dry_run_s"] = dry_run_seconds()
    text = json.dumps(out)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if not failed and queued == args.n and len(ids) == args.n else 1


if __name__ == "__main__":
    raise SystemExit(main())

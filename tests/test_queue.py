"""SweepQueue against SQLite (file in tmp_path) and PostgreSQL.

PostgreSQL comes from $TEST_POSTGRES_URL, or else this module starts the
throwaway server with scripts/postgres.sh (and stops it at the end if it
started it). Each PostgreSQL test gets its own schema, so tests are independent.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import subprocess
import threading
import uuid
from collections import Counter
from datetime import timezone
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
import sqlalchemy as sa

from service.queue import (
    TERMINAL,
    InvalidTransition,
    SweepQueue,
    SweepState,
    default_queue_url,
)

REPO = Path(__file__).resolve().parents[1]
PG_SCRIPT = REPO / "scripts" / "postgres.sh"

S = SweepState


# -- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server_url():
    url = os.environ.get("TEST_POSTGRES_URL")
    if url:
        yield url
        return
    already_running = subprocess.run([str(PG_SCRIPT), "status"], check=False).returncode == 0
    subprocess.run([str(PG_SCRIPT), "start"], check=True, timeout=300)
    url = subprocess.run(
        [str(PG_SCRIPT), "url"], check=True, capture_output=True, text=True
    ).stdout.strip()
    yield url
    if not already_running:  # don't pull a server someone else started out from under them
        subprocess.run([str(PG_SCRIPT), "stop"], check=False, timeout=60)


def _libpq_dsn(sa_url: str) -> str:
    return sa.make_url(sa_url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgres"])
def queue_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'queue.db'}"
        return
    server = request.getfixturevalue("pg_server_url")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq_dsn(server), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    # search_path via libpq "options": SweepQueue creates its table in the fresh schema.
    sep = "&" if "?" in server else "?"
    yield f"{server}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(_libpq_dsn(server), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def q(queue_url):
    queue = SweepQueue(queue_url)
    yield queue
    queue.close()


def _submit_n(q, n, priority=0):
    return [q.submit(f"s{i}", f"name: s{i}\n", priority=priority) for i in range(n)]


def _drive(q, sweep_id, target):
    """Bring a freshly queued sweep into state `target` through legal moves."""
    if target is S.QUEUED:
        return q.get(sweep_id)
    if target is S.CANCELLED:
        return q.mark(sweep_id, S.CANCELLED)
    rec = q.mark(sweep_id, S.RUNNING)
    return rec if target is S.RUNNING else q.mark(sweep_id, target)


# -- basics -----------------------------------------------------------------


def test_submit_fields(q):
    spec = "name: mnist-tp\nsearch:\n  lr: [0.1, 0.01]\n"
    rec = q.submit("mnist-tp", spec, priority=3, resume_of="sw-0123456789ab")
    assert rec.id.startswith("sw-") and len(rec.id) == 15
    int(rec.id[3:], 16)  # hex
    assert rec.name == "mnist-tp" and rec.spec_yaml == spec and rec.priority == 3
    assert rec.state is S.QUEUED and rec.attempts == 0 and rec.cancel_requested is False
    assert rec.started_at is None and rec.finished_at is None and rec.error is None
    assert rec.progress == {} and rec.resume_of == "sw-0123456789ab"
    assert rec.created_at.tzinfo is not None and rec.created_at.utcoffset().total_seconds() == 0
    assert q.get(rec.id) == rec
    other = q.submit("mnist-tp", spec)
    assert other.id != rec.id and other.seq > rec.seq


def test_unknown_id_raises_keyerror(q):
    for call in (
        lambda: q.get("sw-000000000000"),
        lambda: q.mark("sw-000000000000", S.RUNNING),
        lambda: q.cancel("sw-000000000000"),
        lambda: q.update("sw-000000000000", progress={"done": 1}),
        lambda: q.update("sw-000000000000"),
    ):
        with pytest.raises(KeyError):
            call()


def test_update_progress_and_mlflow_ids(q):
    rec = q.submit("a", "x")
    q.update(rec.id, progress={"done": 2, "running": 1, "pending": 5, "best": {"val_acc": 0.97}})
    q.update(rec.id, mlflow_experiment_id="12", mlflow_parent_run_id="abc123")
    got = q.get(rec.id)
    assert got.progress == {"done": 2, "running": 1, "pending": 5, "best": {"val_acc": 0.97}}
    assert (got.mlflow_experiment_id, got.mlflow_parent_run_id) == ("12", "abc123")
    # None leaves fields alone; progress is replaced, not merged.
    q.update(rec.id, progress={"done": 3})
    got = q.get(rec.id)
    assert got.progress == {"done": 3}
    assert got.mlflow_experiment_id == "12" and got.mlflow_parent_run_id == "abc123"


def test_list_orderings(q):
    a = q.submit("a", "x", priority=0)
    b = q.submit("b", "x", priority=1)
    c = q.submit("c", "x", priority=0)
    q.mark(c.id, S.CANCELLED)
    assert [r.id for r in q.list(S.QUEUED)] == [b.id, a.id]
    assert [r.id for r in q.list()] == [c.id, b.id, a.id]  # all: newest first
    assert [r.id for r in q.list(S.CANCELLED)] == [c.id]
    assert [r.id for r in q.list(limit=2)] == [c.id, b.id]
    assert q.list(S.RUNNING) == [] and q.running() == []


def _revision(q) -> int:
    with q._read() as conn:
        return conn.execute(sa.text("SELECT rev FROM queue_revision WHERE id = 1")).scalar_one()


def test_list_sees_every_change_made_by_another_process(q, queue_url):
    """Lists are served from memory while the queue's revision stands still: every change made
    through another SweepQueue (as by the dispatcher's process) shows at once, and writes that
    change nothing (an empty claim, an unknown id) leave the revision alone."""
    other = SweepQueue(queue_url)
    try:
        a = q.submit("a", "x")
        first = q.list()
        assert [r.id for r in first] == [a.id]
        rev = _revision(q)
        assert q.claim_next(max_running=1) is not None and q.claim_next(max_running=1) is None
        rev = _revision(q)
        assert q.claim_next(max_running=1) is None and _revision(q) == rev  # nothing changed
        with pytest.raises(KeyError):
            q.update("sw-000000000000", progress={"done": 1})
        assert _revision(q) == rev
        listed = q.list()
        assert q.list() == listed and _revision(q) == rev
        # Each kind of write, made elsewhere, is seen by the next list here.
        b = other.submit("b", "x")
        assert [r.id for r in q.list()] == [b.id, a.id]
        other.update(a.id, progress={"done": 3})
        assert q.list()[1].progress == {"done": 3}
        other.update(a.id, mlflow_experiment_id="7", mlflow_parent_run_id="p")
        assert q.list()[1].mlflow_experiment_id == "7"
        other.cancel(b.id)
        assert q.list()[0].state is S.CANCELLED and [r.id for r in q.list(S.CANCELLED)] == [b.id]
        other.mark(a.id, S.FAILED, error="boom")
        assert q.list(S.FAILED)[0].error == "boom" and q.list(S.RUNNING) == []
        other.retry(a.id)
        assert [r.id for r in q.list(S.QUEUED)] == [a.id]
        assert _revision(q) > rev
    finally:
        other.close()


# -- ordering and max_running -------------------------------------------------


def test_priority_then_fifo(q):
    prios = [0, 5, 0, 5, -1, 10, 0]
    recs = [q.submit(f"s{i}", "x", priority=p) for i, p in enumerate(prios)]
    expected = [r.id for r in sorted(recs, key=lambda r: (-r.priority, r.seq))]
    assert [r.id for r in q.list(S.QUEUED)] == expected
    claimed = []
    while (rec := q.claim_next(max_running=100)) is not None:
        assert rec.state is S.RUNNING and rec.attempts == 1 and rec.started_at is not None
        claimed.append(rec.id)
    assert claimed == expected


def test_max_running_one(q):
    a, b, c = _submit_n(q, 3)
    first = q.claim_next(max_running=1)
    assert first.id == a.id
    assert q.claim_next(max_running=1) is None
    assert q.get(b.id).state is S.QUEUED
    q.mark(a.id, S.SUCCEEDED)
    assert q.claim_next(max_running=1).id == b.id
    assert q.claim_next(max_running=1) is None
    q.mark(b.id, S.FAILED, error="boom")
    assert q.claim_next(max_running=1).id == c.id
    assert [r.id for r in q.running()] == [c.id]


def test_max_running_two(q):
    a, b, c = _submit_n(q, 3)
    assert q.claim_next(max_running=2).id == a.id
    assert q.claim_next(max_running=2).id == b.id
    assert q.claim_next(max_running=2) is None
    assert {r.id for r in q.running()} == {a.id, b.id}
    # A higher limit lets the third one through.
    assert q.claim_next(max_running=3).id == c.id
    assert q.claim_next(max_running=3) is None  # nothing left


def test_max_running_rejects_nonpositive(q):
    q.submit("a", "x")
    with pytest.raises(ValueError):
        q.claim_next(max_running=0)


def test_requeue_keeps_place_and_counts_attempts(q):
    a, b = _submit_n(q, 2)
    assert q.claim_next(max_running=1).id == a.id
    requeued = q.mark(a.id, S.QUEUED, error="ray job vanished")
    assert requeued.state is S.QUEUED and requeued.started_at is None
    assert requeued.error == "ray job vanished"
    again = q.claim_next(max_running=1)
    assert again.id == a.id and again.attempts == 2  # back at the front, 2nd dispatch
    assert q.get(b.id).attempts == 0


def test_retry_failed_clears_finish_and_error(q):
    a, b = _submit_n(q, 2)
    q.claim_next()
    q.mark(a.id, S.FAILED, error="driver crashed")
    rec = q.retry(a.id)
    assert rec.state is S.QUEUED and rec.finished_at is None and rec.error is None
    again = q.claim_next(max_running=1)
    assert again.id == a.id and again.attempts == 2  # back at the front of the line


@pytest.mark.parametrize("state", [S.QUEUED, S.RUNNING, S.SUCCEEDED, S.CANCELLED])
def test_retry_refuses_anything_but_failed(q, state):
    (a,) = _submit_n(q, 1)
    before = _drive(q, a.id, state)
    with pytest.raises(InvalidTransition):
        q.retry(a.id)
    assert q.get(a.id) == before
    with pytest.raises(KeyError):
        q.retry("sw-nope")


def test_terminal_sets_finished_at_and_error(q):
    (a,) = _submit_n(q, 1)
    q.claim_next()
    done = q.mark(a.id, S.FAILED, error="OOM in trial 3")
    assert done.state is S.FAILED and done.error == "OOM in trial 3"
    assert done.finished_at is not None and done.finished_at >= done.started_at


# -- transitions ----------------------------------------------------------------

ALLOWED = {
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.CANCELLED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.QUEUED),
}


def test_transition_table(q):
    for src, dst in itertools.product(S, S):
        rec = q.submit(f"{src.value}->{dst.value}", "x")
        before = _drive(q, rec.id, src)
        assert before.state is src
        if (src, dst) in ALLOWED:
            assert q.mark(rec.id, dst).state is dst
        else:
            with pytest.raises(InvalidTransition):
                q.mark(rec.id, dst)
            assert q.get(rec.id) == before, f"{src}->{dst} changed the record"


# -- cancel ---------------------------------------------------------------------


def test_cancel_queued_is_immediate(q):
    a, b = _submit_n(q, 2)
    rec = q.cancel(a.id)
    assert rec.state is S.CANCELLED and rec.finished_at is not None
    assert q.claim_next(max_running=5).id == b.id  # cancelled one is never dispatched
    assert q.claim_next(max_running=5) is None


def test_cancel_running_requests_then_dispatcher_marks(q):
    (a,) = _submit_n(q, 1)
    q.claim_next()
    rec = q.cancel(a.id)
    assert rec.state is S.RUNNING and rec.cancel_requested is True and rec.finished_at is None
    assert q.cancel(a.id) == rec  # asking twice changes nothing
    assert [r.cancel_requested for r in q.running()] == [True]
    done = q.mark(a.id, S.CANCELLED)
    assert done.state is S.CANCELLED and done.finished_at is not None


def test_requeue_after_cancel_request_becomes_cancelled(q):
    (a,) = _submit_n(q, 1)
    q.claim_next()
    q.cancel(a.id)
    rec = q.mark(a.id, S.QUEUED)  # e.g. the job vanished while a cancel was pending
    assert rec.state is S.CANCELLED
    assert q.claim_next(max_running=5) is None


@pytest.mark.parametrize("terminal", sorted(TERMINAL, key=lambda s: s.value))
def test_cancel_terminal_is_noop(q, terminal):
    (a,) = _submit_n(q, 1)
    before = _drive(q, a.id, terminal)
    assert q.cancel(a.id) == before
    assert q.get(a.id) == before


# -- durability -----------------------------------------------------------------


def test_restart_keeps_everything(queue_url):
    q1 = SweepQueue(queue_url)
    running = q1.submit("run", "a: 1\n", priority=2)
    queued = q1.submit("wait", "b: 2\n", priority=1, resume_of=running.id)
    queued2 = q1.submit("wait2", "c: 3\n", priority=1)
    done = q1.submit("done", "d: 4\n")
    assert q1.claim_next(max_running=1).id == running.id
    q1.update(running.id, progress={"done": 1, "best": {"acc": 0.5}}, mlflow_experiment_id="3",
              mlflow_parent_run_id="r1")
    q1.cancel(running.id)
    q1.mark(done.id, S.CANCELLED)
    snapshot = {r.id: r for r in q1.list(limit=1000)}
    assert len(snapshot) == 4
    q1.close()

    q2 = SweepQueue(queue_url)
    try:
        after = {r.id: r for r in q2.list(limit=1000)}
        assert after == snapshot  # every field, timestamps included
        assert after[running.id].state is S.RUNNING and after[running.id].cancel_requested
        assert after[running.id].progress == {"done": 1, "best": {"acc": 0.5}}
        assert after[queued.id].resume_of == running.id
        assert [r.id for r in q2.running()] == [running.id]
        # Dispatch continues where it left off, and new submits sort after old ones.
        assert q2.claim_next(max_running=1) is None
        q2.mark(running.id, S.CANCELLED)
        late = q2.submit("late", "e: 5\n", priority=1)
        assert late.seq > max(r.seq for r in snapshot.values())
        assert [r.id for r in q2.list(S.QUEUED)] == [queued.id, queued2.id, late.id]
        assert q2.claim_next(max_running=1).id == queued.id
    finally:
        q2.close()


def test_burst_of_200_submits_keeps_order(q):
    recs = [q.submit(f"b{i}", f"i: {i}\n", priority=i % 3) for i in range(200)]
    seqs = [r.seq for r in recs]
    assert seqs == sorted(seqs) and len(set(seqs)) == 200
    assert len({r.id for r in recs}) == 200
    expected = [r.id for r in sorted(recs, key=lambda r: (-r.priority, r.seq))]
    assert [r.id for r in q.list(S.QUEUED, limit=1000)] == expected
    assert [r.id for r in q.list(limit=1000)] == [r.id for r in reversed(recs)]
    # claim_next follows the same order (a prefix keeps the test quick).
    claimed = [q.claim_next(max_running=1000).id for _ in range(30)]
    assert claimed == expected[:30]
    assert [r.id for r in q.list(S.QUEUED, limit=1000)] == expected[30:]


# -- concurrency ------------------------------------------------------------------


def _run_threads(n, target):
    errors = []

    def wrapped(i):
        try:
            target(i)
        except BaseException as e:  # surface thread failures in the test
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "thread hung"
    if errors:
        raise errors[0]


def test_threads_claim_each_sweep_exactly_once(q):
    ids = {r.id for r in _submit_n(q, 20)}
    claimed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(_):
        barrier.wait()
        while (rec := q.claim_next(max_running=1000)) is not None:
            with lock:
                claimed.append(rec.id)

    _run_threads(8, worker)
    dupes = [i for i, n in Counter(claimed).items() if n > 1]
    assert not dupes, f"claimed more than once: {dupes}"
    assert set(claimed) == ids
    assert all(r.attempts == 1 for r in q.running()) and len(q.running()) == 20


def test_threads_never_exceed_max_running_one(q):
    ids = {r.id for r in _submit_n(q, 20)}
    n_threads = 12
    barrier = threading.Barrier(n_threads)
    finished: list[str] = []
    overlaps: list[int] = []
    lock = threading.Lock()

    # Round 1: everyone claims at the same instant; exactly one may win.
    winners = []

    def first_round(_):
        barrier.wait()
        rec = q.claim_next(max_running=1)
        if rec is not None:
            with lock:
                winners.append(rec.id)

    _run_threads(n_threads, first_round)
    assert len(winners) == 1 and len(q.running()) == 1
    q.mark(winners[0], S.SUCCEEDED)
    finished.append(winners[0])

    # Then all threads hammer claim_next; whoever holds a sweep checks it is alone.
    def hammer(_):
        barrier.wait()
        while True:
            rec = q.claim_next(max_running=1)
            if rec is None:
                if not q.list(S.QUEUED, limit=1):
                    return
                continue
            n = len(q.running())
            if n != 1:
                with lock:
                    overlaps.append(n)
            q.mark(rec.id, S.SUCCEEDED)
            with lock:
                finished.append(rec.id)

    _run_threads(n_threads, hammer)
    assert overlaps == []
    assert sorted(finished) == sorted(ids) and len(finished) == 20
    assert all(r.attempts == 1 for r in q.list(S.SUCCEEDED, limit=100))


def _process_claimer(url, barrier, results):
    """Runs in a spawned process; the parent takes part in the barrier between phases.

    Phase A: claim with a large max_running until nothing is queued.
    Phase B: claim with max_running=1, check we are alone while holding a sweep,
    finish it, repeat until the queue is empty.
    """
    queue = SweepQueue(url)
    got_a, got_b, overlaps, err = [], [], [], None
    try:
        barrier.wait(timeout=120)  # start together
        while (rec := queue.claim_next(max_running=1000)) is not None:
            got_a.append(rec.id)
        barrier.wait(timeout=120)  # parent checks phase A and queues batch B
        barrier.wait(timeout=120)
        while True:
            rec = queue.claim_next(max_running=1)
            if rec is None:
                if queue.list(S.QUEUED, limit=1):
                    continue  # the other process holds the single slot
                break
            got_b.append(rec.id)
            if (n := len(queue.running())) != 1:
                overlaps.append(n)
            queue.mark(rec.id, S.SUCCEEDED)
    except Exception as e:  # report instead of dying silently
        err = repr(e)
        barrier.abort()
    finally:
        results.put((got_a, got_b, overlaps, err))
        queue.close()


def test_processes_claim_each_sweep_exactly_once(q, queue_url):
    n_proc = 2
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n_proc + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_process_claimer, args=(queue_url, barrier, results))
        for _ in range(n_proc)
    ]
    batch_a = {r.id for r in _submit_n(q, 20)}
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=120)
        barrier.wait(timeout=120)  # phase A over
        assert {r.id for r in q.running()} == batch_a
        assert all(r.attempts == 1 for r in q.running())
        for sweep_id in batch_a:
            q.mark(sweep_id, S.SUCCEEDED)
        batch_b = {r.id for r in _submit_n(q, 20)}
        barrier.wait(timeout=120)
        outs = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [o[3] for o in outs] == [None] * n_proc
    assert [p.exitcode for p in procs] == [0] * n_proc
    for phase, batch in ((0, batch_a), (1, batch_b)):
        claimed = [i for o in outs for i in o[phase]]
        assert sorted(claimed) == sorted(batch), f"phase {'AB'[phase]}: not each exactly once"
    assert [o[2] for o in outs] == [[]] * n_proc, "more than one RUNNING with max_running=1"
    assert len(q.list(S.SUCCEEDED, limit=100)) == 40


def test_concurrent_submits_get_distinct_ordered_seqs(q):
    recs = []
    lock = threading.Lock()

    def worker(i):
        for j in range(25):
            r = q.submit(f"t{i}-{j}", "x")
            with lock:
                recs.append(r)

    _run_threads(8, worker)
    assert len({r.seq for r in recs}) == 200 and len({r.id for r in recs}) == 200
    # Dispatch order is seq order, whatever order the threads committed in.
    listed = q.list(S.QUEUED, limit=1000)
    assert [r.seq for r in listed] == sorted(r.seq for r in recs)


# -- urls -------------------------------------------------------------------------


@pytest.mark.parametrize("queue_url", ["postgres"], indirect=True)
def test_plain_postgresql_url_is_accepted(queue_url):
    assert queue_url.startswith("postgresql+psycopg://")
    plain = queue_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with SweepQueue(plain) as queue:
        rec = queue.submit("plain", "x")
        assert queue.get(rec.id).name == "plain"


def test_default_queue_url(monkeypatch, tmp_path):
    monkeypatch.setenv("SWEEP_DB_URL", "postgresql://example/sweeps")
    assert default_queue_url() == "postgresql://example/sweeps"
    monkeypatch.delenv("SWEEP_DB_URL")
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "data"))
    url = default_queue_url()
    assert url == f"sqlite:///{tmp_path / 'data' / 'queue.db'}"
    assert (tmp_path / "data").is_dir()
    monkeypatch.delenv("SWEEP_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert default_queue_url() == f"sqlite:///{tmp_path.resolve() / 'sweep_data' / 'queue.db'}"
    with SweepQueue(default_queue_url()) as queue:
        assert queue.submit("x", "y").state is S.QUEUED
    assert (tmp_path / "sweep_data" / "queue.db").is_file()


# -- database settings and outages ----------------------------------------------------------


def test_sqlite_settings(tmp_path):
    """WAL with synchronous=NORMAL (no fsync per commit) and the busy timeout asked for, on
    every pooled connection; a writer that waited for the in-process mutex gets only the rest of
    its time for the file lock, and the connection its full timeout back afterwards."""
    q = SweepQueue(f"sqlite:///{tmp_path / 'q.db'}", busy_timeout_s=2.5)
    with q._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2500
    set_to: list[int] = []

    @sa.event.listens_for(q._engine, "before_cursor_execute")
    def _seen(conn, cursor, statement, *args):
        if statement.startswith("PRAGMA busy_timeout="):
            set_to.append(int(statement.split("=")[1]))

    q._write_mutex.acquire()
    threading.Timer(1.0, q._write_mutex.release).start()
    assert q.submit("t", "name: t\n").name == "t"  # waited about 1 s for the mutex
    assert len(set_to) == 1 and set_to[0] <= 1600, set_to
    q.submit("u", "name: u\n")  # no wait: the full timeout again
    assert set_to[1:] == [2500], set_to
    q.submit("v", "name: v\n")
    assert len(set_to) == 2  # and no PRAGMA at all while nothing changes
    q.close()


def test_unavailable_errors_name_outages_not_mistakes(tmp_path):
    from service.queue import UNAVAILABLE_ERRORS, QueueUnavailable, unavailable_reason

    q = SweepQueue(f"sqlite:///{tmp_path / 'q.db'}", busy_timeout_s=0.2)
    other = sa.create_engine(f"sqlite:///{tmp_path / 'q.db'}").connect()
    other.exec_driver_sql("BEGIN EXCLUSIVE")
    with pytest.raises(UNAVAILABLE_ERRORS) as e:
        q.submit("t", "name: t\n")
    assert unavailable_reason(e.value) == "database is locked"
    other.exec_driver_sql("ROLLBACK")
    other.close()
    assert isinstance(QueueUnavailable("x"), UNAVAILABLE_ERRORS)
    assert not isinstance(KeyError("x"), UNAVAILABLE_ERRORS)
    assert not isinstance(sa.exc.IntegrityError("s", {}, Exception()), UNAVAILABLE_ERRORS)
    q.close()


def test_postgresql_connect_is_bounded_when_the_server_is_away():
    """Nothing listens: the queue fails fast (refused), and its engine has a connect timeout and
    pre-ping for when something half-listens or the server restarted."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(sa.exc.OperationalError):
        SweepQueue(f"postgresql://postgres@127.0.0.1:{port}/sweeps", busy_timeout_s=3)
    assert time.monotonic() - t0 < 5

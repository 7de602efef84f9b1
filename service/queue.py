"""Durable sweep queue on SQLAlchemy Core (SQLite or PostgreSQL).

One table, ``sweeps``. The URL decides the backend:

* ``sqlite:///path/queue.db``: WAL journal (synchronous=NORMAL) and a busy timeout so several
  processes can share the file; every write transaction starts with
  ``BEGIN IMMEDIATE`` so writers queue up on the file lock instead of failing
  when a read lock cannot be upgraded.
* ``postgresql+psycopg://...`` (``postgresql://`` and ``postgres://`` are
  rewritten to psycopg): ``claim_next`` takes a transaction-scoped advisory
  lock so the "fewer than max_running" check cannot be raced, and picks the
  row with ``FOR UPDATE SKIP LOCKED``.

Orderings returned by :meth:`SweepQueue.list`:

* ``state=QUEUED``: dispatch order (priority desc, then seq asc), i.e. the
  order in which ``claim_next`` will hand them out;
* anything else (a non-queued state, or ``None`` = all): newest first (seq desc).
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine, make_url

from worker.lifecycle import SweepState  # the state names; their transitions are below

__all__ = [
    "InvalidTransition",
    "QueueUnavailable",
    "UNAVAILABLE_ERRORS",
    "SweepQueue",
    "SweepRecord",
    "SweepState",
    "TERMINAL",
    "default_queue_url",
]


TERMINAL = frozenset({SweepState.SUCCEEDED, SweepState.FAILED, SweepState.CANCELLED})

# Allowed mark() transitions. Terminal states have no way out (retry() is the one way back in line,
# for a failed sweep).
_TRANSITIONS: dict[SweepState, frozenset[SweepState]] = {
    SweepState.QUEUED: frozenset({SweepState.RUNNING, SweepState.CANCELLED}),
    SweepState.RUNNING: frozenset(
        {SweepState.SUCCEEDED, SweepState.FAILED, SweepState.CANCELLED, SweepState.QUEUED}
    ),
    SweepState.SUCCEEDED: frozenset(),
    SweepState.FAILED: frozenset(),
    SweepState.CANCELLED: frozenset(),
}


class InvalidTransition(Exception):
    """mark() was asked for a state change the state machine does not allow."""

    def __init__(self, sweep_id: str, current: SweepState, requested: SweepState):
        super().__init__(f"{sweep_id}: cannot go from {current.value} to {requested.value}")
        self.sweep_id = sweep_id
        self.current = current
        self.requested = requested


class QueueUnavailable(Exception):
    """The queue database could not be written in time (nothing was changed); try again later."""


# Errors that mean "the database is away or busy, try again" rather than "this is wrong": the API
# answers them 503, the dispatcher retries its tick.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError, sa.exc.DisconnectionError, QueueUnavailable)


def unavailable_reason(exc: BaseException) -> str:
    """One line about a database outage (the driver's message, without SQLAlchemy's SQL dump)."""
    cause = getattr(exc, "orig", None) or exc
    return " ".join(str(cause).split())[:300] or type(exc).__name__


@dataclass(frozen=True)
class SweepRecord:
    id: str
    name: str
    spec_yaml: str
    priority: int
    state: SweepState
    seq: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool
    attempts: int
    progress: dict[str, Any] = field(default_factory=dict)
    mlflow_experiment_id: str | None = None
    mlflow_parent_run_id: str | None = None
    error: str | None = None
    resume_of: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _UTCDateTime(sa.TypeDecorator):
    """Timezone-aware UTC in and out.

    SQLite keeps no offset (values come back naive), PostgreSQL returns them in
    the session time zone; both are normalised to UTC here.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use timezone-aware UTC")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


metadata = sa.MetaData()

sweeps = sa.Table(
    "sweeps",
    metadata,
    # seq doubles as the primary key: the database hands out a monotonically
    # increasing value, which is the FIFO tie-break.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("spec_yaml", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", _UTCDateTime, nullable=False),
    sa.Column("started_at", _UTCDateTime, nullable=True),
    sa.Column("finished_at", _UTCDateTime, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("progress", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
    sa.Column("mlflow_experiment_id", sa.String(64), nullable=True),
    sa.Column("mlflow_parent_run_id", sa.String(64), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("resume_of", sa.String(32), nullable=True),
    sa.Index("ix_sweeps_dispatch", "state", sa.text("priority DESC"), "seq"),
    # AUTOINCREMENT: never reuse a seq, even if rows were ever deleted by hand.
    sqlite_autoincrement=True,
)

# One row counting committed changes to ``sweeps`` (bumped by every write transaction that changed
# a row, in that transaction): a list whose revision has not moved is served from memory, across
# processes alike (the dispatcher writes progress, the API reads it).
queue_revision = sa.Table(
    "queue_revision",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("rev", sa.BigInteger, nullable=False),
)
_REV = sa.select(queue_revision.c.rev).where(queue_revision.c.id == 1)
_BUMP = queue_revision.update().where(queue_revision.c.id == 1).values(rev=queue_revision.c.rev + 1)

# Connections kept open per queue. SQLAlchemy's default (5) closes every connection past the fifth
# when it is returned, so 8 concurrent API requests opened a new PostgreSQL connection (a server
# process) for 3 of every 8: the tail of the list latency. The API serves up to 40 threads.
POOL_SIZE = 16

# PostgreSQL advisory lock keys. Any constants work; they only have to be the
# same in every process using the queue.
_CLAIM_LOCK_KEY = 0x7470_5357_0000_0001
_SCHEMA_LOCK_KEY = 0x7470_5357_0000_0002

_DISPATCH_ORDER = (sweeps.c.priority.desc(), sweeps.c.seq.asc())
# One statement, values bound per call: SQLAlchemy compiles it once (building it per call with
# .values() cost a millisecond of coercions per submission).
_INSERT = sweeps.insert().returning(*sweeps.c)


def _normalise_url(url: str) -> sa.URL:
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def default_queue_url() -> str:
    """The queue database the service settings name (service.settings owns the variables)."""
    from service.settings import queue_url

    return queue_url()


class SweepQueue:
    """Durable queue of sweeps. Safe to use from several threads and processes."""

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0):
        """``busy_timeout_s``: how long a call waits for the database (SQLite's write lock, a
        PostgreSQL connection) before it raises (OperationalError, QueueUnavailable)."""
        self.url = _normalise_url(url)
        self.busy_timeout_s = float(busy_timeout_s)
        self._is_sqlite = self.url.get_backend_name() == "sqlite"
        # SQLite lets one writer in at a time and makes the others sleep-poll (its busy handler
        # backs off up to 100 ms a try): this process's writers queue on a mutex instead, which
        # keeps the tail latency of a burst of writes low. PostgreSQL needs no such thing.
        self._write_mutex: threading.Lock | None = None
        self._read_mutex: threading.Lock | None = None
        if self._is_sqlite:
            self._engine = sa.create_engine(
                self.url, pool_size=POOL_SIZE, max_overflow=POOL_SIZE,
                connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
            )
            _configure_sqlite(self._engine, busy_timeout_s)
            self._write_mutex = threading.Lock()
            self._read_mutex = threading.Lock()
        elif self.url.get_backend_name() == "postgresql":
            # pre_ping: a long-lived dispatcher must survive a database restart (a pooled
            # connection that died with the server is replaced, not used); connect_timeout and
            # pool_timeout: while the server is away a call fails in bounded time.
            self._engine = sa.create_engine(
                self.url, pool_pre_ping=True, pool_timeout=busy_timeout_s,
                pool_size=POOL_SIZE, max_overflow=POOL_SIZE,
                connect_args={"connect_timeout": max(1, round(busy_timeout_s))},
            )
        else:
            raise ValueError(f"unsupported database URL: {self.url!r}")
        _track_changes(self._engine)
        # (state, limit) -> (revision, records) of the last list; see queue_revision.
        self._lists: dict[tuple[Any, int], tuple[int, list[SweepRecord]]] = {}
        # Same pool; only tells the SQLite begin hook to take the write lock up front.
        self._writer = self._engine.execution_options(sqlite_immediate=True)
        with self._write() as conn:
            if not self._is_sqlite:
                # Two processes starting on an empty database must not both run CREATE TABLE.
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
            metadata.create_all(conn)
            if conn.execute(_REV).scalar() is None:  # a new database, or one from before the table
                conn.execute(queue_revision.insert().values(id=1, rev=0))

    # -- lifecycle ---------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite), committed on success. On SQLite the
        wait for this process's mutex and the wait for the file's write lock share one
        ``busy_timeout_s``, so a caller never waits longer than that in all."""
        mutex = self._write_mutex
        deadline = time.monotonic() + self.busy_timeout_s
        if mutex is not None and not mutex.acquire(timeout=self.busy_timeout_s):
            raise QueueUnavailable(f"the queue database is busy: no write slot within {self.busy_timeout_s:g} s")
        try:
            writer = self._writer
            left = deadline - time.monotonic()
            if mutex is not None and left < self.busy_timeout_s - 0.05:
                writer = self._engine.execution_options(sqlite_immediate=True,
                                                        sqlite_busy_ms=max(1, int(left * 1000)))
            with writer.begin() as conn:
                conn.info[_CHANGED] = False
                try:
                    yield conn
                    if conn.info[_CHANGED]:
                        conn.execute(_BUMP)  # last: PostgreSQL holds this row's lock until the commit
                finally:
                    conn.info.pop(_CHANGED, None)
        finally:
            if mutex is not None:
                mutex.release()

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """A connection for one read. On SQLite this process's reads take turns: pysqlite lets go
        of the GIL for every row it steps, so 8 threads reading 100 rows each passed the GIL back
        and forth thousands of times (a 100-row list cost twice the CPU under 8 concurrent
        clients as alone). WAL readers never wait for a writer, so a turn lasts milliseconds."""
        mutex = self._read_mutex
        if mutex is not None and not mutex.acquire(timeout=self.busy_timeout_s):
            raise QueueUnavailable(f"the queue database is busy: no read slot within {self.busy_timeout_s:g} s")
        try:
            with self._engine.connect() as conn:
                yield conn
        finally:
            if mutex is not None:
                mutex.release()

    def warm_up(self, connections: int) -> None:
        """Pay now what a first burst of requests would: open up to ``connections`` pooled
        connections (they stay in the pool) and compile the submission's INSERT (an insert rolled
        back: nothing is written)."""
        with contextlib.ExitStack() as stack:
            for _ in range(min(connections, POOL_SIZE)):
                stack.enter_context(self._engine.connect()).exec_driver_sql("SELECT 1")
        with self._writer.connect() as conn:
            trans = conn.begin()
            try:
                conn.execute(_INSERT, dict(id="sw-warm-up", name="warm-up", spec_yaml="", priority=0,
                                           state=SweepState.QUEUED.value, created_at=_utcnow(),
                                           cancel_requested=False, attempts=0, progress={}, resume_of=None)).one()
            finally:
                trans.rollback()

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> SweepQueue:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writes ------------------------------------------------------------

    def submit(
        self,
        name: str,
        spec_yaml: str,
        priority: int = 0,
        resume_of: str | None = None,
    ) -> SweepRecord:
        """Queue a sweep. ``resume_of`` is stored as given (not checked)."""
        for _ in range(5):
            sweep_id = "sw-" + secrets.token_hex(6)
            values = dict(
                id=sweep_id,
                name=name,
                spec_yaml=spec_yaml,
                priority=int(priority),
                state=SweepState.QUEUED.value,
                created_at=_utcnow(),
                cancel_requested=False,
                attempts=0,
                progress={},
                resume_of=resume_of,
            )
            try:
                with self._write() as conn:
                    row = conn.execute(_INSERT, values).one()
                    return _to_record(row)
            except sa.exc.IntegrityError:
                # 48 random bits make an id clash astronomically rare; retry only that case.
                with self._engine.connect() as conn:
                    clash = conn.execute(
                        sa.select(sweeps.c.seq).where(sweeps.c.id == sweep_id)
                    ).first()
                if clash is None:
                    raise
        raise RuntimeError("could not generate a unique sweep id")

    def claim_next(self, max_running: int = 1) -> SweepRecord | None:
        """Move the best queued sweep to RUNNING if fewer than max_running are running.

        Returns the claimed sweep, or None if the limit is reached or nothing is queued.
        """
        if max_running < 1:
            raise ValueError("max_running must be >= 1")
        with self._write() as conn:
            if not self._is_sqlite:
                # Serialises claimers so the count below stays true until commit.
                # (On SQLite BEGIN IMMEDIATE already holds the database write lock.)
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_CLAIM_LOCK_KEY)))
            n_running = conn.execute(
                sa.select(sa.func.count())
                .select_from(sweeps)
                .where(sweeps.c.state == SweepState.RUNNING.value)
            ).scalar_one()
            if n_running >= max_running:
                return None
            # SKIP LOCKED: don't wait on a row someone is cancelling right now.
            # (FOR UPDATE renders as nothing on SQLite.)
            sweep_id = conn.execute(
                sa.select(sweeps.c.id)
                .where(sweeps.c.state == SweepState.QUEUED.value)
                .order_by(*_DISPATCH_ORDER)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if sweep_id is None:
                return None
            return self._set(conn, sweep_id, self._enter_running())

    def mark(self, sweep_id: str, state: SweepState, error: str | None = None) -> SweepRecord:
        """Apply a state transition; raise InvalidTransition if it is not allowed.

        * -> running (manual; does not check max_running): sets started_at, attempts += 1.
        * -> succeeded/failed/cancelled: sets finished_at.
        * running -> queued (requeue): clears started_at; the sweep keeps its
          priority and seq, so it goes back to its original place in line. If a
          cancel was requested meanwhile it becomes CANCELLED instead, so a
          requeue can never resurrect a sweep the user cancelled.
        ``error`` is stored when given (and left unchanged when None).
        """
        state = SweepState(state)
        with self._write() as conn:
            row = self._fetch_row(conn, sweep_id, for_update=True)
            current = SweepState(row.state)
            if state not in _TRANSITIONS[current]:
                raise InvalidTransition(sweep_id, current, state)
            now = _utcnow()
            if state is SweepState.QUEUED and row.cancel_requested:
                state = SweepState.CANCELLED
            values: dict[str, Any] = {"state": state.value}
            if state is SweepState.RUNNING:
                values.update(self._enter_running())
            elif state is SweepState.QUEUED:
                values["started_at"] = None
            else:
                values["finished_at"] = now
            if error is not None:
                values["error"] = error
            return self._set(conn, sweep_id, values)

    def update(
        self,
        sweep_id: str,
        *,
        progress: dict[str, Any] | None = None,
        mlflow_experiment_id: str | None = None,
        mlflow_parent_run_id: str | None = None,
    ) -> None:
        """Set the given fields (None = leave unchanged). ``progress`` replaces the old dict."""
        values: dict[str, Any] = {}
        if progress is not None:
            values["progress"] = dict(progress)
        if mlflow_experiment_id is not None:
            values["mlflow_experiment_id"] = mlflow_experiment_id
        if mlflow_parent_run_id is not None:
            values["mlflow_parent_run_id"] = mlflow_parent_run_id
        with self._write() as conn:
            if values:
                self._set(conn, sweep_id, values)
            else:
                self._fetch_row(conn, sweep_id)  # still raise KeyError for unknown ids

    def cancel(self, sweep_id: str) -> SweepRecord:
        """Queued: cancelled at once. Running: cancel_requested=True (the dispatcher
        stops the job, then marks it cancelled). Terminal: returned unchanged."""
        with self._write() as conn:
            row = self._fetch_row(conn, sweep_id, for_update=True)
            current = SweepState(row.state)
            if current is SweepState.QUEUED:
                values = {
                    "state": SweepState.CANCELLED.value,
                    "cancel_requested": True,
                    "finished_at": _utcnow(),
                }
            elif current is SweepState.RUNNING:
                values = {"cancel_requested": True}
            else:
                return _to_record(row)
            return self._set(conn, sweep_id, values)

    def retry(self, sweep_id: str) -> SweepRecord:
        """failed -> queued, back in its original place in line, with finished_at and error
        cleared; its next run keeps the finished trials and resumes the rest from their
        checkpoints. InvalidTransition from any other state."""
        with self._write() as conn:
            row = self._fetch_row(conn, sweep_id, for_update=True)
            current = SweepState(row.state)
            if current is not SweepState.FAILED:
                raise InvalidTransition(sweep_id, current, SweepState.QUEUED)
            return self._set(conn, sweep_id, {"state": SweepState.QUEUED.value, "started_at": None,
                                              "finished_at": None, "error": None})

    # -- reads -------------------------------------------------------------

    def get(self, sweep_id: str) -> SweepRecord:
        with self._read() as conn:
            return self._fetch(conn, sweep_id)

    def list(self, state: SweepState | None = None, limit: int = 100) -> list[SweepRecord]:
        query = sa.select(sweeps)
        if state is None:
            query = query.order_by(sweeps.c.seq.desc())
        else:
            state = SweepState(state)
            query = query.where(sweeps.c.state == state.value)
            if state is SweepState.QUEUED:
                query = query.order_by(*_DISPATCH_ORDER)
            else:
                query = query.order_by(sweeps.c.seq.desc())
        key = (state, limit)
        with self._read() as conn:
            # Read before the rows: rows read after it are at least as new as it says.
            rev = conn.execute(_REV).scalar()
            hit = self._lists.get(key)
            if hit is not None and rev is not None and hit[0] == rev:
                return list(hit[1])  # records are frozen; nothing changed since they were read
            recs = [_to_record(r) for r in conn.execute(query.limit(limit))]
        if rev is not None:
            if len(self._lists) > 64:
                self._lists.clear()
            self._lists[key] = (rev, recs)
        return list(recs)

    def running(self) -> list[SweepRecord]:
        """All RUNNING sweeps, oldest claim first."""
        query = (
            sa.select(sweeps)
            .where(sweeps.c.state == SweepState.RUNNING.value)
            .order_by(sweeps.c.started_at.asc(), sweeps.c.seq.asc())
        )
        with self._read() as conn:
            return [_to_record(r) for r in conn.execute(query)]

    # -- helpers -----------------------------------------------------------

    @staticmethod
    def _enter_running() -> dict[str, Any]:
        return {
            "state": SweepState.RUNNING.value,
            "started_at": _utcnow(),
            "finished_at": None,
            "attempts": sweeps.c.attempts + 1,
        }

    @staticmethod
    def _fetch_row(conn: Connection, sweep_id: str, for_update: bool = False) -> sa.Row:
        query = sa.select(sweeps).where(sweeps.c.id == sweep_id)
        if for_update:
            query = query.with_for_update()
        row = conn.execute(query).one_or_none()
        if row is None:
            raise KeyError(sweep_id)
        return row

    def _fetch(self, conn: Connection, sweep_id: str) -> SweepRecord:
        return _to_record(self._fetch_row(conn, sweep_id))

    @staticmethod
    def _set(conn: Connection, sweep_id: str, values: dict[str, Any]) -> SweepRecord:
        row = conn.execute(
            sweeps.update().where(sweeps.c.id == sweep_id).values(**values).returning(*sweeps.c)
        ).one_or_none()
        if row is None:
            raise KeyError(sweep_id)
        return _to_record(row)


_COLUMNS = tuple(c.name for c in sweeps.c)
_STATES = {s.value: s for s in SweepState}  # a dict lookup: SweepState(value) costs 10x more


def _to_record(row: sa.Row) -> SweepRecord:
    """A row of ``select(sweeps)`` or ``returning(*sweeps.c)`` (the table's column order).
    Unpacked by position: attribute access on a Row costs about as much as the rest of a list."""
    (seq, id_, name, spec_yaml, priority, state, created_at, started_at, finished_at, cancel_requested,
     attempts, progress, mlflow_experiment_id, mlflow_parent_run_id, error, resume_of) = row
    # A frozen dataclass's __init__ sets each field through object.__setattr__ (19 us for 16 fields
    # here, against 3 for a plain one): filling __dict__ directly makes the same frozen record.
    rec = object.__new__(SweepRecord)
    rec.__dict__.update(
        id=id_,
        name=name,
        spec_yaml=spec_yaml,
        priority=priority,
        state=_STATES[state],
        seq=seq,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        cancel_requested=bool(cancel_requested),
        attempts=attempts,
        progress=dict(progress or {}),
        mlflow_experiment_id=mlflow_experiment_id,
        mlflow_parent_run_id=mlflow_parent_run_id,
        error=error,
        resume_of=resume_of,
    )
    return rec


# _to_record's unpacking follows the table and fills every field of the record: keep them in step.
assert {f.name for f in dataclasses.fields(SweepRecord)} == set(_COLUMNS)
assert _COLUMNS == ("seq", "id", "name", "spec_yaml", "priority", "state", "created_at", "started_at",
                    "finished_at", "cancel_requested", "attempts", "progress", "mlflow_experiment_id",
                    "mlflow_parent_run_id", "error", "resume_of"), _COLUMNS


_CHANGED = "tp_sweeps_changed"


def _track_changes(engine: Engine) -> None:
    """Flag a write transaction's connection once a statement changed a row of ``sweeps`` (its
    revision is then bumped, see _write)."""

    @sa.event.listens_for(engine, "after_cursor_execute")
    def _after(conn, cursor, statement, parameters, context, executemany):
        if _CHANGED in conn.info and context is not None and context.isinsert | context.isupdate | context.isdelete:
            table = getattr(context.compiled.statement, "table", None) if context.compiled is not None else None
            # With RETURNING, pysqlite counts rows only once they are fetched (0 here): assume a
            # change (at worst a list is read again).
            returning = getattr(context.compiled, "effective_returning", None)
            if table is sweeps and (cursor.rowcount != 0 or returning):
                conn.info[_CHANGED] = True


def _configure_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    """WAL + busy timeout, and take over BEGIN so writes can use BEGIN IMMEDIATE.

    pysqlite's own implicit BEGIN is DEFERRED; a deferred transaction that reads
    and then writes can fail with SQLITE_BUSY without waiting, so the driver's
    transaction handling is switched off and SQLAlchemy's begin event emits BEGIN.
    """

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # driver: no implicit BEGIN/COMMIT
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # NORMAL (SQLite's advice for WAL): a commit no longer waits for an fsync (3-5 ms each here,
        # serialised over all writers, most of a submission's time under load). The database stays
        # consistent whatever happens, and a crash of the service loses nothing; only an OS crash or
        # power cut can undo the last commits before the next checkpoint.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.close()

    full_ms = int(busy_timeout_s * 1000)

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        opts = conn.get_execution_options()
        # A writer that already waited for the mutex waits only what is left for the file lock;
        # the connection gets the full timeout back on its next use.
        busy_ms = opts.get("sqlite_busy_ms", full_ms)
        info = conn.connection.info
        if info.get("busy_ms", full_ms) != busy_ms:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={int(busy_ms)}")
            info["busy_ms"] = busy_ms
        conn.exec_driver_sql("BEGIN IMMEDIATE" if opts.get("sqlite_immediate", False) else "BEGIN")

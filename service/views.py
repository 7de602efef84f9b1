"""SweepView: what the API returns for a sweep, and what the CLIs print.

Defined once here (Pydantic only, no FastAPI, Ray or MLflow) so the API, the HTTP client and the
embedded CLIs build and read exactly the same shape. A view is a queue record plus what the Ray Job
left in the sweep's folder (``result.json`` once the sweep has finished, ``started.json`` for the
tracking URI the job actually used).
"""
from __future__ import annotations

import functools
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, TypeAdapter

from service.queue import TERMINAL, SweepRecord, SweepState
from worker.lifecycle import read_json  # one reader of the sweep folder's JSON files

SweepStateName = Literal[tuple(s.value for s in SweepState)]  # type: ignore[valid-type]


class SweepView(BaseModel):
    """One sweep as the API shows it."""

    id: str = Field(description="sweep id, e.g. sw-0123456789ab")
    name: str = Field(description="the spec's name (the MLflow experiment name)")
    state: SweepStateName
    priority: int = Field(description="higher runs first")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = Field(description="how many times the sweep was handed to Ray (resubmissions count)")
    cancel_requested: bool = False
    progress: dict[str, Any] = Field(
        default_factory=dict,
        description="the job's progress.json: total, done, running, pending, errored, best {rule: value}, "
        "epochs_reported",
    )
    n_trials: int | None = Field(None, description="trials the spec expands to")
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_id: str | None = None
    mlflow_parent_run_id: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = Field(
        None, description="the job's result.json summary (incl. table_markdown) once the sweep has finished"
    )

    @property
    def is_terminal(self) -> bool:
        return SweepState(self.state) in TERMINAL


class SweepList(BaseModel):
    sweeps: list[SweepView]


# ---- building views from queue records ------------------------------------------------------


@functools.cache
def _fast_loader() -> type | None:
    """worker.spec's SpecLoader with libyaml's scanner and parser under it (about 15x faster than
    PyYAML's pure-Python ones, which were most of a submission's cost); None without libyaml.

    Everything that decides what a spec means stays SpecLoader's own: the composer hook that refuses
    anchors, aliases and tags, the duplicate-key check and the implicit resolvers (no timestamps,
    1e-4 read as a float)."""
    try:
        from yaml._yaml import CParser
    except ImportError:
        return None
    from yaml.composer import Composer
    from yaml.constructor import SafeConstructor
    from yaml.resolver import Resolver

    from worker.spec import SpecLoader

    class FastSpecLoader(CParser, SpecLoader):
        # CParser's own get_single_node composes in C and would skip SpecLoader.compose_node.
        get_single_node = Composer.get_single_node
        check_node = Composer.check_node
        get_node = Composer.get_node

        def __init__(self, stream):
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    return FastSpecLoader


def spec_from_text(text: str):
    """``SweepSpec.from_yaml(text)``, fast. A document the fast loader cannot read is handed to
    ``from_yaml`` itself, so every refusal carries worker.spec's own path and reason."""
    from worker.spec import SweepSpec

    loader_cls = _fast_loader()
    data = None
    if loader_cls is not None and text.strip() and len(text) <= MAX_FAST_CHARS:
        try:
            loader = loader_cls(text)
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
        except Exception:  # syntax, refused anchors/tags, duplicate keys, nesting: the slow path says which
            data = None
    if data is None:
        return SweepSpec.from_yaml(text)
    return SweepSpec.from_dict(data)


# Larger documents go the canonical way, which also enforces the 1 MiB limit on the encoded size.
MAX_FAST_CHARS = 256 * 1024


@functools.lru_cache(maxsize=4096)
def n_trials_of(spec_yaml: str) -> int | None:
    """Trials a stored spec expands to (cached: a stored spec never changes)."""
    from worker.spec import SpecError

    try:
        return spec_from_text(spec_yaml).n_trials()
    except SpecError:
        return None


class ViewBuilder:
    """Turns queue records into SweepViews; caches what cannot change any more (the result of a
    finished sweep), so listing many sweeps reads few files."""

    def __init__(self, sweeps_dir: Path, tracking_uri: str | None):
        self.sweeps_dir = Path(sweeps_dir)
        self.tracking_uri = tracking_uri
        self._final: dict[str, tuple[dict[str, Any] | None, str | None]] = {}
        # Trials per sweep id (a stored spec never changes): a list of 100 sweeps would otherwise
        # parse 100 specs the first time it is asked for.
        self._n_trials: dict[str, int | None] = {}
        # The view last made of each record whose view depends on nothing but the record: reused
        # while the queue hands out that same (frozen) record, as its list cache does.
        self._views: dict[str, tuple[SweepRecord, SweepView]] = {}

    def _files(self, rec: SweepRecord) -> tuple[dict[str, Any] | None, str | None]:
        """(result, tracking uri the job used)."""
        if not rec.is_terminal:
            self._final.pop(rec.id, None)  # retried: its old result is not its result any more
        cached = self._final.get(rec.id)
        if cached is not None:
            return cached
        if not rec.mlflow_experiment_id and not rec.is_terminal:
            return None, None  # a queued sweep has no files yet (most of a long list)
        folder = self.sweeps_dir / rec.id
        started = read_json(folder / "started.json") if rec.mlflow_experiment_id else None
        uri = (started or {}).get("tracking_uri")
        result = read_json(folder / "result.json") if rec.is_terminal else None
        if rec.is_terminal and result is not None:  # a result may still be on its way: retry later
            if len(self._final) > 10_000:
                self._final.clear()
            self._final[rec.id] = (result, uri)
        return result, uri

    def n_trials(self, rec: SweepRecord, known: int | None = None) -> int | None:
        if known is None:
            if rec.id in self._n_trials:
                return self._n_trials[rec.id]
            known = n_trials_of(rec.spec_yaml)
        if len(self._n_trials) > 100_000:
            self._n_trials.clear()
        self._n_trials[rec.id] = known
        return known

    def _data(self, rec: SweepRecord, n_trials: int | None = None) -> dict[str, Any]:
        result, uri = self._files(rec)
        return dict(
            id=rec.id,
            name=rec.name,
            state=rec.state.value,
            priority=rec.priority,
            created_at=rec.created_at,
            started_at=rec.started_at,
            finished_at=rec.finished_at,
            attempts=rec.attempts,
            cancel_requested=rec.cancel_requested,
            progress=rec.progress,
            n_trials=self.n_trials(rec, n_trials),
            mlflow_tracking_uri=uri or self.tracking_uri,
            mlflow_experiment_id=rec.mlflow_experiment_id,
            mlflow_parent_run_id=rec.mlflow_parent_run_id,
            error=rec.error,
            result=result,
        )

    def view(self, rec: SweepRecord, n_trials: int | None = None) -> SweepView:
        """``n_trials``: when the caller has the validated spec at hand (saves parsing it again)."""
        return SweepView.model_validate(self._data(rec, n_trials))

    def views(self, recs: list[SweepRecord]) -> list[SweepView]:
        """Many views in one validation (pydantic-core loops in Rust: 3x faster than one model
        at a time), made only for records not seen before."""
        out: list[SweepView | None] = []
        todo: list[int] = []
        for i, rec in enumerate(recs):
            hit = self._views.get(rec.id)
            out.append(hit[1] if hit is not None and hit[0] is rec else None)
            if out[-1] is None:
                todo.append(i)
        if todo:
            made = _VIEW_LIST.validate_python([self._data(recs[i]) for i in todo])
            if len(self._views) > 10_000:
                self._views.clear()
            for i, view in zip(todo, made):
                out[i] = view
                rec = recs[i]
                # Files of a sweep in flight, or a result still on its way, may change without
                # the record changing: those views are made afresh each time.
                if (rec.is_terminal and rec.id in self._final) or (not rec.mlflow_experiment_id and not rec.is_terminal):
                    self._views[rec.id] = (rec, view)
        return out  # type: ignore[return-value]


_VIEW_LIST = TypeAdapter(list[SweepView])


def mlflow_ui_hint(view: SweepView) -> str | None:
    """Where to look at the sweep in the MLflow UI."""
    uri, exp, run = view.mlflow_tracking_uri, view.mlflow_experiment_id, view.mlflow_parent_run_id
    if not uri or not exp:
        return None
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        return f"{base}/#/experiments/{exp}" + (f"/runs/{run}" if run else "")
    return (f"mlflow ui --backend-store-uri {uri}  then open experiment {exp}"
            + (f", run {run}" if run else ""))


__all__ = ["SweepList", "SweepView", "ViewBuilder", "mlflow_ui_hint", "n_trials_of", "read_json", "spec_from_text"]

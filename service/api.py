"""The sweep service's HTTP API (FastAPI), with the dispatcher running in a thread beside it.

    python -m service.api [--host 127.0.0.1] [--port 8000] [--no-dispatcher] [--poll-interval 1]

Routes (every one but /health needs ``Authorization: Bearer $SWEEP_API_TOKEN`` when that is set):

* ``POST /sweeps`` body = the spec, YAML (application/x-yaml, text/yaml, text/plain) or a JSON
  object (application/json); ``?priority=N`` overrides the spec's priority. 201 -> SweepView;
  422 -> ``{"detail": [{"path", "reason"}, ...]}`` (nothing queued); 413 over 1 MiB.
* ``GET /sweeps?state=&limit=`` -> ``{"sweeps": [SweepView, ...]}``
* ``GET /sweeps/{id}`` -> SweepView (404 ``{"detail": "..."}``)
* ``GET /sweeps/{id}/spec`` -> the stored spec as YAML text
* ``POST /sweeps/{id}/cancel`` -> SweepView (idempotent)
* ``POST /sweeps/{id}/retry`` -> SweepView (409 unless the sweep failed)
* ``GET /health`` -> ``{"status": "ok", "queue", "dispatcher", "ray"}`` (open)
* ``/docs``, ``/openapi.json``: FastAPI's (open: they hold no data, and a browser could not send
  the token to load them). The document lists every status the routes answer with and the error
  bodies as they are; tests/test_api_contract.py fuzzes the live API against it (schemathesis).

While the queue database cannot be reached (PostgreSQL restarting, SQLite locked by another writer
for longer than ``DB_WAIT_S``) every route that needs it answers 503 with ``Retry-After``; the
dispatcher thread keeps running and reconnects by itself.

The request path imports neither Ray nor MLflow: specs are validated with ``worker.spec``.
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import re
import sys
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, Literal

import yaml
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.queue import UNAVAILABLE_ERRORS, InvalidTransition, SweepQueue, SweepState, unavailable_reason
from service.settings import Settings
from service.views import SweepList, SweepView, ViewBuilder, spec_from_text
from worker.spec import DOCUMENT, MAX_SPEC_BYTES, SpecError, SweepSpec

log = logging.getLogger("service.api")

YAML_TYPES = {"application/x-yaml", "application/yaml", "text/yaml", "text/x-yaml", "text/plain"}
JSON_TYPES = {"application/json"}
MAX_LIST = 1000
INT32 = (-(2**31), 2**31 - 1)  # the queue's priority column
# How long a request waits for the queue database (SQLite's write lock, a PostgreSQL connection)
# before it answers 503: long enough for ordinary contention, short enough that a client is told
# to come back instead of hanging while the database restarts.
DB_WAIT_S = 5.0
RETRY_AFTER_S = 5
WARM_CONNECTIONS = 8  # the queue's connection pool is filled this far at start


class _Unprocessable(Exception):
    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors


def _detail(path: str, reason: str) -> dict[str, str]:
    return {"path": path, "reason": reason}


# ---- what the API answers, as documented ------------------------------------------------------


class Problem(BaseModel):
    """Every error but 422."""

    detail: str


class FieldProblem(BaseModel):
    path: str = Field(description="dotted path of the field (search.seeds[1]); <document> for the body as a whole")
    reason: str


class InvalidInput(BaseModel):
    """422: every problem found, each with its path; nothing was queued."""

    detail: list[FieldProblem] = Field(min_length=1)


class Health(BaseModel):
    status: Literal["ok"]
    queue: str = Field(description="the queue database's backend: sqlite or postgresql")
    dispatcher: Literal["running", "stopped"]
    ray: str | None = Field(description="the Ray Jobs API the dispatcher uses (RAY_ADDRESS)")


def _problem(description: str, **headers: str) -> dict[str, Any]:
    out: dict[str, Any] = {"model": Problem, "description": description}
    if headers:
        out["headers"] = {name: {"description": text, "required": True, "schema": {"type": "string"}}
                          for name, text in headers.items()}
    return out


R401 = {401: _problem("missing or wrong bearer token (only when the service has a token)",
                      **{"WWW-Authenticate": "Bearer"})}
R404 = {404: _problem("no such sweep")}
R422 = {422: {"model": InvalidInput, "description": "invalid input: every problem with its path"}}
R503 = {503: _problem("the queue database is unavailable (restarting, or locked by another writer); "
                      "nothing was changed: retry", **{"Retry-After": "seconds to wait before retrying"})}

# The spec's JSON Schema (from the Pydantic model, so it cannot drift), under components/schemas.
_SPEC_SCHEMA_NOTE = (
    "The sweep spec (worker.spec.SweepSpec): YAML text, or the same document as a JSON object. "
    "Rules beyond this schema (min < max, rule and dataset names, parameter paths, trial counts, "
    "printable names, ...) are checked too: a body that breaks one gets 422 with the field's path.")


def _spec_components() -> dict[str, Any]:
    schema = SweepSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    props = schema["properties"]
    props["priority"] = {**props["priority"], "minimum": INT32[0], "maximum": INT32[1]}
    props["name"] = {**props["name"], "minLength": 1, "maxLength": 200}
    schema["description"] = _SPEC_SCHEMA_NOTE
    return {**defs, "SweepSpec": schema}


_SPEC_REF = {"$ref": "#/components/schemas/SweepSpec"}
_SPEC_BODY = {
    "required": True,
    "description": _SPEC_SCHEMA_NOTE + " An empty body is not a spec (422). application/yaml, text/yaml "
                   "and text/plain are read as YAML too, a body without Content-Type as well.",
    "content": {t: {"schema": _SPEC_REF} for t in ("application/x-yaml", "application/json")},
}


def _finish_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents its own 422 body on every route with parameters; ours has another shape
    (InvalidInput) and only two routes can answer 422 at all: drop the rest."""
    for item in schema.get("paths", {}).values():
        for op in item.values():
            r422 = op.get("responses", {}).get("422")
            if r422 and "HTTPValidationError" in json.dumps(r422):
                del op["responses"]["422"]
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    for name, sub in _spec_components().items():
        comps.setdefault(name, sub)
    return schema


def _allowed_methods(schema: dict[str, Any], path: str) -> list[str]:
    """The documented methods of the paths that ``path`` matches."""
    out: set[str] = set()
    for template, item in schema.get("paths", {}).items():
        rx = "".join("[^/]+" if part.startswith("{") else re.escape(part)
                     for part in re.split(r"(\{[^}]*\})", template))
        if re.fullmatch(rx, path):
            out.update(m.upper() for m in item if m in ("get", "put", "post", "delete", "patch", "head", "options"))
    return sorted(out)


# ---- auth ------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="SWEEP_API_TOKEN (only when the service has one)")


def _require_token(request: Request, cred: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    token: str | None = request.app.state.settings.api_token
    if not token:
        return
    given = cred.credentials if cred is not None and cred.scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong bearer token (send Authorization: Bearer $SWEEP_API_TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )


# ---- spec parsing ----------------------------------------------------------------------------


def _media_type(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";")[0].strip().lower()


async def _read_body(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise HTTPException(400, detail="bad Content-Length") from None
        if n > MAX_SPEC_BYTES:
            raise HTTPException(413, detail=f"spec is larger than 1 MiB ({n} bytes)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_SPEC_BYTES:
            raise HTTPException(413, detail=f"spec is larger than 1 MiB (more than {MAX_SPEC_BYTES} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _dump_yaml(data: Any) -> str:
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's emitter when there is one
    return yaml.dump(data, Dumper=dumper, sort_keys=False, allow_unicode=True, width=100)


def _parse_spec(body: bytes, media_type: str) -> tuple[SweepSpec, str]:
    """(validated spec, the YAML text to store: what the worker will read)."""
    try:
        if media_type in JSON_TYPES or media_type.endswith("+json"):
            try:
                data = json.loads(body.decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                raise SpecError.at(DOCUMENT, f"spec is not UTF-8 text ({e.reason} at byte {e.start})") from None
            except ValueError as e:
                raise SpecError.at(DOCUMENT, f"JSON syntax error: {e}") from None
            SweepSpec.from_dict(data)  # errors with paths into the object as sent
            text = _dump_yaml(data)
        else:
            text = body.decode("utf-8-sig") if body else ""
        spec = spec_from_text(text)  # what the worker will read back
    except SpecError as e:
        raise _Unprocessable([_detail(fe.path, fe.reason) for fe in e.errors]) from None
    except UnicodeDecodeError as e:
        raise _Unprocessable([_detail(DOCUMENT, f"spec is not UTF-8 text ({e.reason} at byte {e.start})")]) from None
    except RecursionError:
        raise _Unprocessable([_detail(DOCUMENT, "spec is nested too deeply")]) from None
    except yaml.YAMLError as e:  # worker.spec lets PyYAML's reader errors (a NUL byte, ...) through
        raise _Unprocessable([_detail(DOCUMENT, "YAML error: " + " ".join(str(e).split()))]) from None
    except ArithmeticError as e:
        # A validator that overflowed on an extreme number (e.g. a range of 5e-324 steps): the
        # input's fault, not the service's; worker.spec should say which field.
        log.warning("spec validation overflowed: %r", e)
        raise _Unprocessable([_detail(DOCUMENT, f"a number in the spec is out of range ({e})")]) from None
    if not INT32[0] <= spec.priority <= INT32[1]:
        raise _Unprocessable([_detail("priority", "must fit in 32 bits")])
    return spec, text


# ---- the app ---------------------------------------------------------------------------------


def _warm_up(queue: SweepQueue, views: ViewBuilder) -> None:
    """What the first requests would otherwise pay for, paid at start: the spec reader and the
    first use of the spec's validators, the list query and the trial counts of the sweeps a first
    list shows (a spec parse each), WARM_CONNECTIONS database connections and the INSERT's compilation
    (a first burst of 8 submissions on PostgreSQL took 200-300 ms each)."""
    try:
        spec_from_text("name: warm-up\nbase: {dataset: spiral}\n").n_trials()
        for state in (None, SweepState.QUEUED):
            SweepList(sweeps=views.views(queue.list(state, limit=100))).model_dump_json()
        queue.warm_up(WARM_CONNECTIONS)
    except Exception as e:  # noqa: BLE001 - a failed warm-up costs speed, never the start
        log.warning("warm-up failed: %s", e)

def create_app(
    settings: Settings | None = None,
    *,
    queue: SweepQueue | None = None,
    dispatcher: bool | None = None,
    poll_interval: float = 1.0,
) -> FastAPI:
    """The API. ``dispatcher``: run the dispatcher thread (default: when a Ray address is set).
    A ``queue`` passed in is used as is and left open; otherwise one is opened on
    ``settings.db_url`` for the app's lifetime."""
    if settings is None:
        from service.settings import load

        settings = load()
    run_dispatcher = bool(settings.ray_address) if dispatcher is None else dispatcher

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own_queue = queue is None
        q = queue if queue is not None else SweepQueue(settings.db_url, busy_timeout_s=DB_WAIT_S)
        app.state.queue = q
        await run_in_threadpool(_warm_up, q, app.state.views)
        d = None
        if run_dispatcher:
            from service.dispatcher import Dispatcher

            d = Dispatcher(settings, q, poll_interval=poll_interval)
            d.start()
        elif settings.ray_address is None:
            log.info("no RAY_ADDRESS: the dispatcher is off, sweeps stay queued")
        app.state.dispatcher = d
        try:
            yield
        finally:
            if d is not None:
                d.stop()
            if own_queue:
                q.close()

    app = FastAPI(
        title="tp-sweep service",
        version="0.1.0",
        summary="Queue target-propagation hyperparameter sweeps and run them on a Ray cluster.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.views = ViewBuilder(settings.sweeps_dir, settings.tracking_uri)
    app.state.dispatcher = None

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _finish_openapi(get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(_Unprocessable)
    async def _on_unprocessable(request: Request, exc: _Unprocessable):
        return JSONResponse(status_code=422, content={"detail": exc.errors})

    async def _on_database_down(request: Request, exc: Exception):
        log.warning("queue database unavailable (%s %s -> 503): %s", request.method, request.url.path,
                    unavailable_reason(exc))
        return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                            content={"detail": "the queue database is unavailable (restarting or busy); "
                                               f"nothing was changed: retry in {RETRY_AFTER_S} s"})

    for exc_type in UNAVAILABLE_ERRORS:  # "not now" rather than "wrong"
        app.add_exception_handler(exc_type, _on_database_down)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the methods of the first route on the path (GET /sweeps and
            # POST /sweeps are two routes): Allow lists them all.
            headers["Allow"] = ", ".join(_allowed_methods(app.openapi(), request.url.path))
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError):
        out = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body", "header")]
            out.append(_detail(".".join(loc) or DOCUMENT, err.get("msg", "invalid")))
        return JSONResponse(status_code=422, content={"detail": out})

    def _queue(request: Request) -> SweepQueue:
        return request.app.state.queue

    def _view(request: Request, rec, n_trials: int | None = None) -> SweepView:
        return request.app.state.views.view(rec, n_trials=n_trials)

    def _json(model, status_code: int = 200) -> Response:
        # Already a validated model: serialise it once (FastAPI would validate it again).
        return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")

    def _get_or_404(q: SweepQueue, sweep_id: str):
        try:
            return q.get(sweep_id)
        except KeyError:
            raise HTTPException(404, detail=f"no sweep {sweep_id!r}") from None

    def _wake(request: Request) -> None:
        d = request.app.state.dispatcher
        if d is not None:
            d.wake()

    @app.get("/health", tags=["service"], response_model=Health, operation_id="health")
    def health(request: Request) -> Health:
        """Liveness; needs no token."""
        q = request.app.state.queue
        d = request.app.state.dispatcher
        return Health(status="ok", queue=q.url.get_backend_name(),
                      dispatcher="running" if d is not None and d.is_running() else "stopped",
                      ray=settings.ray_address)

    def route(method: str, path: str, *, responses: dict | None = None, **kw):
        """A route that needs the token and the queue. (Added on the app itself: FastAPI builds an
        included router's routes lazily, which cost the first request 170 ms.)"""
        return app.api_route(path, methods=[method], dependencies=[Depends(_require_token)], tags=["sweeps"],
                             responses={**R401, **R503, **(responses or {})}, **kw)

    @route(
        "POST", "/sweeps",
        operation_id="submit_sweep",
        status_code=201,
        response_model=SweepView,
        responses={
            400: _problem("a Content-Length that is not a number"),
            413: _problem("body larger than 1 MiB"),
            415: _problem("a Content-Type that is neither YAML nor JSON"),
            **R422,
        },
        openapi_extra={"requestBody": _SPEC_BODY},
    )
    async def submit(
        request: Request,
        priority: int | None = Query(None, ge=INT32[0], le=INT32[1],
                                     description="overrides the spec's priority (higher runs first)"),
    ) -> SweepView:
        """Queue a sweep. The body is the spec itself (YAML text or a JSON object)."""
        media = _media_type(request)
        if media and media not in YAML_TYPES | JSON_TYPES and not media.endswith(("+json", "+yaml")) \
                and media != "application/octet-stream":
            raise HTTPException(415, detail=f"unsupported Content-Type {media!r}: send the spec as "
                                            f"application/x-yaml, text/yaml, text/plain or application/json")
        body = await _read_body(request)

        def work() -> SweepView:
            spec, text = _parse_spec(body, media)
            rec = _queue(request).submit(spec.name, text, priority=spec.priority if priority is None else priority)
            return _view(request, rec, n_trials=spec.n_trials())

        view = await run_in_threadpool(work)
        _wake(request)
        return _json(view, 201)

    @route("GET", "/sweeps", response_model=SweepList, responses=R422, operation_id="list_sweeps")
    def list_sweeps(
        request: Request,
        state: SweepState | None = Query(None, description="only sweeps in this state"),
        limit: int = Query(100, ge=1, le=MAX_LIST),
    ) -> SweepList:
        """Sweeps, newest first (with state=queued: in dispatch order)."""
        recs = _queue(request).list(state, limit=limit)
        return _json(SweepList(sweeps=request.app.state.views.views(recs)))

    @route("GET", "/sweeps/{sweep_id}", response_model=SweepView, responses=R404, operation_id="get_sweep")
    def get_sweep(request: Request, sweep_id: str) -> SweepView:
        return _json(_view(request, _get_or_404(_queue(request), sweep_id)))

    @route("GET", "/sweeps/{sweep_id}/spec", response_class=Response, operation_id="get_sweep_spec",
                responses={200: {"description": "the spec as stored: YAML text, comments and all",
                                 "content": {"application/x-yaml": {"schema": _SPEC_REF}}}, **R404})
    def get_spec(request: Request, sweep_id: str) -> Response:
        """The spec as stored (the text the worker runs)."""
        rec = _get_or_404(_queue(request), sweep_id)
        return Response(rec.spec_yaml, media_type="application/x-yaml")

    @route("POST", "/sweeps/{sweep_id}/cancel", response_model=SweepView, responses=R404, operation_id="cancel_sweep")
    def cancel_sweep(request: Request, sweep_id: str) -> SweepView:
        """Queued: cancelled now. Running: the dispatcher stops the Ray job (Tune saves its
        state), then marks it cancelled. Finished: unchanged."""
        q = _queue(request)
        try:
            rec = q.cancel(sweep_id)
        except KeyError:
            raise HTTPException(404, detail=f"no sweep {sweep_id!r}") from None
        _wake(request)
        return _json(_view(request, rec))

    @route("POST", "/sweeps/{sweep_id}/retry", response_model=SweepView, operation_id="retry_sweep",
                 responses={**R404, 409: _problem("the sweep has not failed")})
    def retry_sweep(request: Request, sweep_id: str) -> SweepView:
        """A failed sweep goes back in line; its next run keeps the trials that finished and resumes
        the rest from their checkpoints."""
        q = _queue(request)
        try:
            rec = q.retry(sweep_id)
        except KeyError:
            raise HTTPException(404, detail=f"no sweep {sweep_id!r}") from None
        except InvalidTransition as e:
            raise HTTPException(409, detail=f"sweep {sweep_id} is {e.current.value}; "
                                            "only a failed sweep can be retried") from None
        _wake(request)
        return _json(_view(request, rec))

    return app


# ---- serving -------------------------------------------------------------------------------


class ServerThread:
    """The app under uvicorn in a background thread (tests, benchmarks)::

        with ServerThread(app, port=0) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import threading

        import uvicorn

        self.host = host
        # log_config=None: uvicorn's default logging set-up runs logging.config.dictConfig, which
        # closes every handler the host process has (absl's, imported with TensorFlow, then
        # closes the stream it was given: a test's captured stderr). Only set uvicorn's levels.
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    lifespan="on", access_log=False, log_config=None))
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.port = port

    def start(self, timeout: float = 30.0) -> "ServerThread":
        import time

        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        self.port = sock.getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- command line ----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    from service.settings import load

    settings = load()
    p = argparse.ArgumentParser(prog="python -m service.api", description="Run the sweep API (and dispatcher).")
    p.add_argument("--host", default=settings.api_host, help="bind address (default $SWEEP_API_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=settings.api_port, help="port (default $SWEEP_API_PORT or 8000)")
    p.add_argument("--no-dispatcher", action="store_true", help="only serve the API; sweeps stay queued")
    p.add_argument("--poll-interval", type=float, default=1.0, help="dispatcher poll interval, seconds")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    if not is_loopback(args.host) and not settings.api_token:
        print(f"service.api: refusing to listen on {args.host}: it is reachable beyond this machine and "
              f"SWEEP_API_TOKEN is not set (set a token, or bind to 127.0.0.1)", file=sys.stderr)
        return 2
    if args.poll_interval <= 0:
        print("service.api: --poll-interval must be > 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = replace(settings, api_host=args.host, api_port=args.port)
    app = create_app(settings, dispatcher=False if args.no_dispatcher else None, poll_interval=args.poll_interval)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The sweeps the CLIs work on, behind one interface (:class:`Sweeps`), two ways:

- :class:`SweepClient`: the sweep API over HTTP (httpx; bearer token from SWEEP_API_TOKEN);
- :class:`LocalSweeps`: the local queue database (embedded mode: no service).

Both answer with the same :class:`~service.views.SweepView`s, and every failure is a
:class:`ServiceError` whose ``str()`` is one line fit for a terminal; ``status`` is the HTTP status
(None when the service could not be reached; LocalSweeps uses the status the API would answer)
and ``detail`` the API's ``detail`` (for a 422: the list of ``{"path", "reason"}``).
"""
from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

import httpx

from service.views import SweepView

DEFAULT_TIMEOUT = 30.0


class ServiceError(Exception):
    def __init__(self, message: str, status: int | None = None, detail: Any = None):
        super().__init__(message)
        self.status = status
        self.detail = detail

    @property
    def is_bad_input(self) -> bool:
        """The request itself was wrong (invalid spec, unknown sweep): exit code 2 in the CLIs."""
        return self.status in (400, 404, 409, 413, 415, 422)


def _format_detail(detail: Any) -> str:
    if isinstance(detail, list):
        items = []
        for d in detail:
            if isinstance(d, dict) and "reason" in d:
                items.append(f"{d.get('path')}: {d['reason']}" if d.get("path") else str(d["reason"]))
            else:
                items.append(str(d))
        return "; ".join(items)
    return " ".join(str(detail).split())


@runtime_checkable
class Sweeps(Protocol):
    """What the CLIs need of the sweeps, wherever they are kept."""

    base_url: str  # where they are: the API's URL, or the queue database's

    def list(self, state: str | None = None, limit: int | None = None) -> list[SweepView]: ...

    def get(self, sweep_id: str) -> SweepView: ...

    def spec(self, sweep_id: str) -> str: ...

    def submit(self, spec: str | bytes | dict[str, Any], *, priority: int | None = None) -> SweepView: ...

    def cancel(self, sweep_id: str) -> SweepView: ...

    def retry(self, sweep_id: str) -> SweepView: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Sweeps": ...

    def __exit__(self, *exc) -> None: ...


class SweepClient:
    """``SweepClient(url, token)``; or ``SweepClient.from_settings(settings, url=None)``."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.base_url = base_url.rstrip("/")
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    @classmethod
    def from_settings(cls, settings, url: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> "SweepClient":
        base = url or settings.service_url
        if not base:
            raise ServiceError("no service URL: pass --service URL or set SWEEP_SERVICE_URL")
        return cls(base, settings.api_token, timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "SweepClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- plumbing -------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TimeoutException:
            raise ServiceError(f"{self.base_url}: no answer within the timeout ({method} {path})") from None
        except httpx.HTTPError as e:
            raise ServiceError(f"cannot reach the sweep service at {self.base_url}: "
                               f"{' '.join(str(e).split()) or type(e).__name__}") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except (ValueError, AttributeError):
                detail = r.text
            text = _format_detail(detail) or r.reason_phrase
            if r.status_code == 401:
                text += " (set SWEEP_API_TOKEN to the service's token)"
            prefix = "invalid spec" if r.status_code == 422 and method == "POST" and path == "/sweeps" \
                else f"HTTP {r.status_code}"
            raise ServiceError(f"{prefix}: {text}"[:2000], r.status_code, detail)
        return r

    def _json(self, method: str, path: str, **kw) -> Any:
        r = self._request(method, path, **kw)
        try:
            return r.json()
        except ValueError:
            raise ServiceError(f"{self.base_url}: not a JSON answer to {method} {path}", r.status_code) from None

    # ---- the API --------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def submit(self, spec: str | bytes | dict[str, Any], *, priority: int | None = None,
               content_type: str | None = None) -> SweepView:
        """Queue a spec given as YAML text/bytes or as a dict (sent as JSON)."""
        if isinstance(spec, dict):
            body = json.dumps(spec).encode()
            content_type = content_type or "application/json"
        else:
            body = spec.encode() if isinstance(spec, str) else spec
            content_type = content_type or "application/x-yaml"
        params = {"priority": str(priority)} if priority is not None else None
        data = self._json("POST", "/sweeps", content=body, params=params,
                          headers={"Content-Type": content_type})
        return SweepView.model_validate(data)

    def list(self, state: str | None = None, limit: int | None = None) -> list[SweepView]:
        params: dict[str, str] = {}
        if state:
            params["state"] = state
        if limit:
            params["limit"] = str(limit)
        data = self._json("GET", "/sweeps", params=params)
        return [SweepView.model_validate(s) for s in data.get("sweeps", [])]

    def get(self, sweep_id: str) -> SweepView:
        return SweepView.model_validate(self._json("GET", f"/sweeps/{quote(sweep_id, safe='')}"))

    def spec(self, sweep_id: str) -> str:
        return self._request("GET", f"/sweeps/{quote(sweep_id, safe='')}/spec").text

    def cancel(self, sweep_id: str) -> SweepView:
        return SweepView.model_validate(self._json("POST", f"/sweeps/{quote(sweep_id, safe='')}/cancel"))

    def retry(self, sweep_id: str) -> SweepView:
        """Put a failed sweep back in line (409 if it has not failed)."""
        return SweepView.model_validate(self._json("POST", f"/sweeps/{quote(sweep_id, safe='')}/retry"))


class LocalSweeps:
    """What :class:`SweepClient` does, straight on the local queue database (embedded mode: no
    service), with the API's checks and answers: an invalid spec is a 422 with the field paths, an
    unknown id a 404, a retry of a sweep that has not failed a 409."""

    def __init__(self, settings):
        from service.queue import SweepQueue
        from service.views import ViewBuilder

        self.settings = settings
        try:
            self._queue = SweepQueue(settings.db_url)
        except Exception as e:
            raise ServiceError(f"cannot open the queue database {settings.db_url}: "
                               f"{' '.join(str(e).split())[:300]}") from None
        self._views = ViewBuilder(settings.sweeps_dir, settings.tracking_uri)
        self.base_url = settings.db_url

    def close(self) -> None:
        self._queue.close()

    def __enter__(self) -> "LocalSweeps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record(self, sweep_id: str):
        try:
            return self._queue.get(sweep_id)
        except KeyError:
            raise ServiceError(f"no sweep {sweep_id!r} in {self.settings.db_url}", 404) from None

    def list(self, state: str | None = None, limit: int | None = None) -> list[SweepView]:
        from service.queue import SweepState

        try:
            st = SweepState(state) if state else None
        except ValueError:
            raise ServiceError(f"unknown state {state!r}", 422) from None
        return [self._views.view(r) for r in self._queue.list(st, limit=limit or 100)]

    def get(self, sweep_id: str) -> SweepView:
        return self._views.view(self._record(sweep_id))

    def spec(self, sweep_id: str) -> str:
        return self._record(sweep_id).spec_yaml

    @property
    def queue(self):
        """The queue itself, for running a sweep in this process (service.submit)."""
        return self._queue

    def submit(self, spec: str | bytes | dict[str, Any], *, priority: int | None = None) -> SweepView:
        """Queue a spec given as YAML text/bytes or as a dict; stored as YAML text, as the API does."""
        from service.views import spec_from_text
        from worker.spec import SpecError

        try:
            if isinstance(spec, dict):
                import yaml

                text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100)
            else:
                text = spec.decode("utf-8-sig") if isinstance(spec, bytes) else spec
            parsed = spec_from_text(text)
        except SpecError as e:
            detail = [{"path": fe.path, "reason": fe.reason} for fe in e.errors]
            raise ServiceError(f"invalid spec: {_format_detail(detail)}"[:2000], 422, detail) from None
        except UnicodeDecodeError as e:
            raise ServiceError(f"invalid spec: not UTF-8 text ({e.reason} at byte {e.start})", 422) from None
        rec = self._queue.submit(parsed.name, text, parsed.priority if priority is None else priority)
        return self._views.view(rec)

    def cancel(self, sweep_id: str) -> SweepView:
        self._record(sweep_id)
        return self._views.view(self._queue.cancel(sweep_id))

    def retry(self, sweep_id: str) -> SweepView:
        """Put a failed sweep back in line (a 409 ServiceError if it has not failed)."""
        from service.queue import InvalidTransition

        self._record(sweep_id)
        try:
            return self._views.view(self._queue.retry(sweep_id))
        except InvalidTransition as e:
            raise ServiceError(f"HTTP 409: sweep {sweep_id} is {e.current.value}; only a failed sweep can be "
                               "retried", 409) from None


def open_sweeps(settings, service_url: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Sweeps:
    """The API client when a service URL is given (argument or SWEEP_SERVICE_URL), else the
    local queue."""
    url = service_url or settings.service_url
    if url:
        return SweepClient(url, settings.api_token, timeout)
    return LocalSweeps(settings)


__all__ = ["LocalSweeps", "ServiceError", "SweepClient", "Sweeps", "open_sweeps"]

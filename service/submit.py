"""``python -m service.submit SPEC.yaml``: validate a sweep spec, queue it, run it.

With ``SWEEP_SERVICE_URL`` (or ``--service``) set, the spec goes to the API and the sweep runs on
its Ray cluster. Without one, it runs embedded: recorded in the local queue database, run
in-process on a local Ray, logged to the local MLflow store, with live progress. Exit codes: 0
success, 2 invalid input, 1 anything else (an interrupted sweep exits 130)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from worker.lifecycle import RunOutcome, SweepState

EXIT_OK, EXIT_FAIL, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Args(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)


def _parser() -> argparse.ArgumentParser:
    p = _Args(prog="python -m service.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", help="sweep spec (YAML)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded trials and run nothing")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--wait", dest="wait", action="store_true", default=True, help="wait for the end (default)")
    w.add_argument("--no-wait", dest="wait", action="store_false", help="queue and return")
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    p.add_argument("--resume", metavar="SWEEP_ID", help="embedded: resume an interrupted sweep or retry a failed one; with a service: retry a failed one")
    p.add_argument("--service", metavar="URL", help="API to submit to (default: $SWEEP_SERVICE_URL)")
    p.add_argument("--priority", type=int, help="override the spec's priority")
    p.add_argument("--num-cpus", type=int, help="embedded: CPUs of the local Ray (default: all)")
    return p


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _console():
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160  # a log file: a wide table reads better than one wrapped at 80
    return console


def print_spec_errors(errors) -> None:
    for e in errors:
        print(f"error: {e.path}: {e.reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.spec and not args.resume:
        _err("give a spec file (or --resume SWEEP_ID)")
        return EXIT_INPUT
    from worker.spec import SpecError, load_spec

    spec, spec_text = None, None
    if args.spec:
        path = Path(args.spec)
        if not path.is_file():
            _err(f"{args.spec}: no such file")
            return EXIT_INPUT
        try:
            spec_text = path.read_text()
            spec = load_spec(path)
        except SpecError as e:
            print_spec_errors(e.errors)
            print(f"error: {args.spec}: {len(e.errors)} problem(s); nothing was queued", file=sys.stderr)
            return EXIT_INPUT
        except UnicodeDecodeError:
            _err(f"{args.spec}: not a text file")
            return EXIT_INPUT
    if args.dry_run:
        return dry_run(spec, args.json)
    service = (args.service or os.environ.get("SWEEP_SERVICE_URL") or "").rstrip("/")
    if service:
        return submit_remote(service, spec_text, args)
    return submit_embedded(spec, spec_text, args)


def dry_run(spec, as_json: bool) -> int:
    trials = spec.expand()
    if as_json:
        print(json.dumps({"name": spec.name, "n_trials": len(trials), "trials": trials}, default=str))
        return EXIT_OK
    from rich.table import Table

    t = Table(title=f"{spec.name}: {len(trials)} trial(s) (sampled values are a preview; Tune draws its own)")
    keys = sorted({k for tr in trials for k in tr["params"]})
    for k in ["#", *keys, "seed"]:
        t.add_column(k)
    for tr in trials:
        t.add_row(str(tr["trial"]), *[_fmt(tr["params"].get(k)) for k in keys], str(tr["seed"]))
    from rich.console import Console

    Console().print(t)
    return EXIT_OK


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- service mode ----------------------------------------------------------------------------------
def submit_remote(url: str, spec_text: str | None, args) -> int:
    """Send the spec to the API (with --resume ID: ask it to retry that failed sweep); with --wait,
    follow the sweep until it ends."""
    from service.client import ServiceError, SweepClient
    from service.settings import load

    console = _console()
    try:
        with SweepClient.from_settings(load(), url) as client:
            if args.resume:
                view = client.retry(args.resume)
                console.print(f"retrying failed sweep [bold]{view.id}[/] ({view.name}) at {url}")
            else:
                view = client.submit(spec_text, priority=args.priority)
                console.print(f"queued sweep [bold]{view.id}[/] ({view.name}, {view.n_trials} trials) at {url}")
            if not args.wait:
                if args.json:
                    print(json.dumps({"sweep_id": view.id, "state": view.state, "experiment_name": view.name}))
                return EXIT_OK
            view = _follow(client, view, console)
    except ServiceError as e:
        if e.detail and isinstance(e.detail, list):
            for d in e.detail:
                print(f"error: {d.get('path')}: {d.get('reason')}", file=sys.stderr)
        else:
            _err(str(e))
        return EXIT_INPUT if e.is_bad_input else EXIT_FAIL
    except KeyboardInterrupt:
        console.print(f"stopped following; the sweep goes on. Follow it with: python -m service.status {view.id}")
        return EXIT_INTERRUPTED
    result = view.result or {}
    if result.get("table"):
        from service.status import COMPARISON_TITLE, comparison_view

        console.print(comparison_view(result["table"], console, COMPARISON_TITLE))
    console.print(f"sweep [bold]{view.id}[/]: {view.state}" + (f" ({view.error})" if view.error else ""))
    if view.mlflow_tracking_uri:
        console.print(f"MLflow: {view.mlflow_tracking_uri}, experiment '{view.name}', parent run {view.mlflow_parent_run_id}")
    if args.json:
        print(json.dumps({"sweep_id": view.id, "state": view.state, "experiment_name": view.name,
                          "experiment_id": view.mlflow_experiment_id, "parent_run_id": view.mlflow_parent_run_id,
                          "tracking_uri": view.mlflow_tracking_uri, "trial_status": result.get("trial_status"),
                          "table": result.get("table", [])}, default=str))
    return EXIT_OK if view.state == SweepState.SUCCEEDED else EXIT_FAIL


def _follow(client, view, console, poll_s: float = 2.0):
    from rich.live import Live

    with Live(console=console, refresh_per_second=2) as live:
        while not view.is_terminal:
            p = view.progress or {}
            best = "  ".join(f"{r} {v:.4f}" for r, v in sorted((p.get("best") or {}).items()))
            live.update(f"[bold]{view.id}[/] {view.state}: {p.get('done', 0)}/{view.n_trials or p.get('total', '?')} done, "
                        f"{p.get('running', 0)} running  {best}")
            time.sleep(poll_s)
            view = client.get(view.id)
    return view


# -- embedded ------------------------------------------------------------------------------------
def submit_embedded(spec, spec_text: str | None, args) -> int:
    from service.client import LocalSweeps, ServiceError
    from service.report import shown_path, shown_uri
    from service.settings import load
    from worker.lifecycle import SweepFolder

    st = load()
    console = _console()
    # The local queue through the same interface a service's client has (submit, retry, ...).
    with LocalSweeps(st) as sweeps:
        if args.resume:
            try:
                view = sweeps.get(args.resume)
            except ServiceError:
                _err(f"no sweep {args.resume} in {st.db_url}")
                return EXIT_INPUT
            if view.state == SweepState.FAILED:
                # Retrying a failed sweep keeps its finished trials; Tune reruns the rest from checkpoints.
                console.print(f"[yellow]retrying failed sweep {view.id}[/] (it failed with: {view.error})")
                view = sweeps.retry(view.id)
            if view.state != SweepState.QUEUED:
                _err(f"sweep {view.id} is {view.state}; only an interrupted (queued) or failed sweep "
                     "can be resumed")
                return EXIT_INPUT
            from worker.spec import load_spec

            spec_text = sweeps.spec(view.id)
            spec = load_spec(spec_text)
        else:
            for old in sweeps.list(SweepState.QUEUED.value):
                if old.attempts > 0:
                    console.print(f"[yellow]note:[/] sweep {old.id} ({old.name}) was interrupted; "
                                  f"resume it with: python -m service.submit --resume {old.id}")
            view = sweeps.submit(spec_text, priority=args.priority)
            console.print(f"queued sweep [bold]{view.id}[/] ({spec.name}, {spec.n_trials()} trials) in "
                          f"{shown_uri(st.db_url, None)}")
        if not args.wait:
            log = SweepFolder(st.data_dir, view.id).log_path
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as f:
                # A detached process runs it, so this command returns at once.
                subprocess.Popen([sys.executable, "-m", "service.submit", "--resume", view.id],
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            console.print(f"running in the background; log: {shown_path(log)}; follow with: "
                          f"python -m service.status {view.id}")
            if args.json:
                print(json.dumps({"sweep_id": view.id, "state": SweepState.QUEUED.value, "experiment_name": spec.name}))
            return EXIT_OK
        return run_embedded(sweeps.queue, view.id, spec, st, args, console)


def run_embedded(queue, sweep_id: str, spec, st, args, console) -> int:
    from worker.lifecycle import INTERRUPTED, SweepFolder, SweepRun, crashed

    queue.mark(sweep_id, SweepState.RUNNING)
    display = _LiveProgress(console, spec, sweep_id)
    folder = SweepFolder(st.data_dir, sweep_id)
    # The same folder and files as a service's Ray job, so status and report read both alike;
    # the queue gets the progress a service's dispatcher would copy from progress.json.
    run = SweepRun(folder, spec, st.tracking_uri, throttle_s=2.0,
                   on_started=lambda exp_id, parent_id: queue.update(
                       sweep_id, mlflow_experiment_id=exp_id, mlflow_parent_run_id=parent_id),
                   on_progress=display.update,
                   on_saved=lambda progress: queue.update(sweep_id, progress=progress))
    from service.report import shown_path

    console.print(f"messages of Ray, Tune and MLflow: {shown_path(folder.log_path)}", highlight=False)
    try:
        with _library_output_to(folder.log_path, console), display:
            res = run.run(num_cpus=args.num_cpus)
    except KeyboardInterrupt:
        queue.mark(sweep_id, SweepState(INTERRUPTED.queue_state))
        console.print(f"[yellow]interrupted.[/] Resume with: python -m service.submit --resume {sweep_id}")
        return INTERRUPTED.exit_code
    except Exception as e:  # the sweep's own failure, not bad input
        out = crashed(e)
        queue.mark(sweep_id, SweepState(out.queue_state), error=out.error)
        raise
    out = run.finish(res)
    queue.mark(sweep_id, SweepState(out.queue_state), error=out.error)
    if res.state == RunOutcome.INTERRUPTED:
        console.print(f"[yellow]interrupted[/] ({res.trial_status}). "
                      f"Resume with: python -m service.submit --resume {sweep_id}")
    else:
        print_result(console, res, run.tracking_uri_set_by_user)
    if args.json:
        print(json.dumps(summary_json(res)))
    return out.exit_code


@contextlib.contextmanager
def _library_output_to(log: Path, console):
    """Send whatever writes to stderr meanwhile (Ray's token notice, MLflow's database creation,
    Tune's messages, C++ logs alike: they all write to file descriptor 2) to ``log``; ``console``
    keeps writing where stderr went before."""
    try:
        redirect = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # stderr is captured in-process (tests)
        redirect = False
    if not redirect:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="replace")
    console.file = real
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real.fileno(), 2)
        console.file = None  # back to sys.stderr (see _console)
        real.close()


def summary_json(res) -> dict[str, Any]:
    return {
        "sweep_id": res.sweep_id, "state": res.state, "experiment_name": res.experiment_name,
        "experiment_id": res.experiment_id, "parent_run_id": res.parent_run_id,
        "tracking_uri": res.tracking_uri, "trial_status": res.trial_status, "table": res.table,
        "artifacts": res.artifacts, "seconds": round(res.seconds, 1),
    }


def print_result(console, res, tracking_uri_set_by_user: bool) -> None:
    from service.report import shown_path, shown_uri
    from service.status import COMPARISON_TITLE, comparison_view
    from worker.tracking import ui_link

    console.print(f"\nsweep [bold]{res.sweep_id}[/]: {res.state} {res.trial_status} in {res.seconds:.0f} s")
    console.print(comparison_view(res.table, console, COMPARISON_TITLE))
    console.print(f"table and plots: {shown_path(Path(res.artifacts[0]).parent) if res.artifacts else '-'} "
                  f"(also on the MLflow parent run {res.parent_run_id})")
    console.print("open the MLflow UI with:")
    uri = shown_uri(res.tracking_uri, tracking_uri_set_by_user)
    console.print(f"  [bold]mlflow ui --backend-store-uri {uri}[/]", soft_wrap=True)
    # A link that opens on the runs: a new browser's MLflow UI opens an experiment on its GenAI side.
    console.print(f"  then http://127.0.0.1:5000/{ui_link(res.experiment_id)} (experiment '{res.experiment_name}')",
                  soft_wrap=True)


class _LiveProgress:
    """Live table: trials done, running and pending, and the best metric so far per rule."""

    def __init__(self, console, spec, sweep_id: str):
        from rich.live import Live

        self.console, self.spec, self.sweep_id = console, spec, sweep_id
        self.p = None
        self.t0 = time.time()
        self._logged_done, self._logged_at = -1, 0.0
        # No redirection of sys.stdout/stderr into the display: libraries' output belongs in the log.
        self.live = Live(self._render(), console=console, refresh_per_second=2, transient=False,
                         redirect_stdout=False, redirect_stderr=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        self.live.update(self._render())
        return self.live.__exit__(*exc)

    def update(self, p) -> None:
        self.p = p
        self.live.update(self._render())
        if not self.console.is_terminal:
            # A log file (--no-wait, nohup) gets no live display: a line per finished trial, and
            # one a minute meanwhile.
            now = time.time()
            if p.done != self._logged_done or now - self._logged_at > 60:
                self._logged_done, self._logged_at = p.done, now
                best = "  ".join(f"{r} {v:.4f}" for r, v in sorted(p.best.items()))
                self.console.print(f"{time.strftime('%H:%M:%S')} {self.sweep_id}: {p.done}/{self.spec.n_trials()} done, "
                                   f"{p.running} running, {now - self.t0:.0f}s"
                                   + (f"; best {self.spec.search.metric}: {best}" if best else ""),
                                   highlight=False, soft_wrap=True)

    def _render(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        total = self.spec.n_trials()
        p = self.p
        done, running = (p.done, p.running) if p else (0, 0)
        pending = max(total - done - running, 0)
        t = Table.grid(padding=(0, 2))
        t.add_row(f"[bold]{self.sweep_id}[/] {self.spec.name}", ProgressBar(total=total, completed=done, width=30),
                  f"{done}/{total} done, {running} running, {pending} pending, {time.time() - self.t0:.0f}s")
        if p and p.best:
            metric = self.spec.search.metric
            t.add_row(f"best {metric}:", "  ".join(f"{r} {v:.4f}" for r, v in sorted(p.best.items())), "")
        return t


if __name__ == "__main__":
    raise SystemExit(main())

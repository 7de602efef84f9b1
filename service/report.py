"""The rule comparison of a sweep, recomputed from MLflow:

    python -m service.report ID [--markdown PATH] [--into FILE] [--json] [--outdir DIR] [--service URL]
                                [--tracking-uri URI] [--spec PATH]

Looks the sweep up (API when ``--service URL`` or SWEEP_SERVICE_URL is given, else the local queue),
then runs ``worker.report.compare`` on its MLflow experiment and parent run with the spec's metric,
mode and swept parameters. Prints the table (one row per rule, or per rule and value of the spec's
``report.group_by`` parameters; narrow terminals get two lines per row), writes comparison.md/.csv and the
plots to ``--outdir`` (default ``$SWEEP_DATA_DIR/reports/<id>/``) with the spec and ``record.json``
(the sweep and MLflow ids, every trial's run, the machines, the commands) and, with ``--markdown PATH``, a
Markdown file with the table, the plots, the sweep and MLflow ids, the date and the command line
that made it. Paths in what it writes are relative to the working directory or the repository, and
the MLflow store is shown as the user set it (MLFLOW_TRACKING_URI, --tracking-uri) or, for the
embedded default, as ``sqlite:///mlflow.db`` in the directory the sweep ran from.

Exit codes: 0 ok, 2 bad input (unknown sweep, bad path), 1 otherwise (e.g. the sweep has no MLflow
runs yet, MLflow unreachable).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from service.client import ServiceError, open_sweeps
from service.views import SweepView, mlflow_ui_hint


class ReportError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# What a spec may change about a sweep already run: how it is described, how its trials are
# grouped and what they are compared to.
REPORT_ONLY_FIELDS = {"description", "published", "report"}
REPO = Path(__file__).resolve().parents[1]


def shown_path(path: str | os.PathLike[str], roots: tuple[Path, ...] = ()) -> str:
    """``path`` relative to the working directory or the repository when it lies inside one, so
    what a report prints holds on another machine; else as given."""
    p = Path(path).resolve()
    for root in (*roots, Path.cwd(), REPO):
        if p.is_relative_to(root.resolve()):
            return str(p.relative_to(root.resolve())) or "."
    return str(path)


def shown_uri(uri: str, set_by_user: bool | None) -> str:
    """A tracking URI fit for a report: as the user set it (MLFLOW_TRACKING_URI, --tracking-uri),
    with any password masked; the embedded default store (sqlite:///<dir>/mlflow.db, ``dir``
    being where the sweep ran) relative to that directory, as ``sqlite:///mlflow.db``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        uri = urlunsplit(parts._replace(netloc=netloc))
    if set_by_user or not uri.startswith("sqlite:////"):
        return uri
    path = Path(uri.removeprefix("sqlite:///"))
    for root in (Path.cwd(), REPO):
        if path.is_relative_to(root.resolve()):
            return f"sqlite:///{path.relative_to(root.resolve())}"
    # Not under this checkout: the default store of the directory the sweep ran from (sweeps that
    # predate the set_by_user flag count as that when the file has the default name).
    if set_by_user is False or path.name == "mlflow.db":
        return f"sqlite:///{path.name}"
    return uri


def build(view: SweepView, spec_yaml: str, tracking_uri: str | None, report_spec_yaml: str | None = None):
    """(Comparison, spec, tracking uri) for a sweep. ``report_spec_yaml`` replaces the stored spec
    if it describes the same trials (it may add published figures, say)."""
    from worker.spec import SpecError, SweepSpec

    if not view.mlflow_experiment_id or not view.mlflow_parent_run_id:
        raise ReportError(f"{view.id} is {view.state} and has no MLflow runs yet"
                          + (" (it never started)" if view.is_terminal else ""))
    try:
        spec = SweepSpec.from_yaml(spec_yaml)
    except SpecError as e:
        raise ReportError(f"{view.id}: the stored spec no longer validates: {e}") from None
    if report_spec_yaml is not None:
        try:
            other = SweepSpec.from_yaml(report_spec_yaml)
        except SpecError as e:
            raise ReportError(f"--spec: {e}", 2) from None
        ran, given = (x.model_dump(mode="json", exclude=REPORT_ONLY_FIELDS) for x in (spec, other))
        differ = sorted(k for k in ran.keys() | given.keys() if ran.get(k) != given.get(k))
        if differ:
            raise ReportError(f"--spec describes other trials than sweep {view.id} ran (differs in: "
                              f"{', '.join(differ)}); only {', '.join(sorted(REPORT_ONLY_FIELDS))} may change", 2)
        spec = other
    uri = tracking_uri or view.mlflow_tracking_uri
    if not uri:
        raise ReportError("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI", 2)
    from worker import tracking
    from worker.report import compare_sweep

    try:
        c = tracking.client(uri)
        cmp = compare_sweep(c, view.mlflow_experiment_id, view.mlflow_parent_run_id, spec)
    except Exception as e:
        raise ReportError(f"reading the runs from MLflow at {uri} failed: {' '.join(str(e).split())[:400]}") from None
    return cmp, spec, uri


def write_outputs(cmp, outdir: Path, record_: dict | None = None, spec_yaml: str | None = None) -> list[Path]:
    from worker.report import plot

    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "comparison.md").write_text(cmp.to_markdown())
    (outdir / "comparison.csv").write_text(cmp.to_csv())
    if spec_yaml is not None:
        (outdir / "spec.yaml").write_text(spec_yaml)
    if record_ is not None:
        (outdir / "record.json").write_text(json.dumps(record_, indent=2, default=str) + "\n")
    return plot(cmp, outdir)


def record(view: SweepView, spec, cmp, shown: str, command: str) -> dict:
    """What it takes to find and reproduce a result: the sweep, its MLflow ids, each trial's run,
    the machines the trials ran on, and the commands."""
    machines = {json.dumps(tr.machine, sort_keys=True) for tr in cmp.trials if tr.machine}
    if machines:
        machine = {"source": "the trials' machine.* tags", "machines": [json.loads(m) for m in sorted(machines)]}
    else:
        from tp_engine.machine import describe

        machine = {"source": "the trials predate machine tags; this is the machine the report ran on",
                   "machines": [describe()]}
    fin = lambda tr, k: tr.metrics.get(f"final/{k}")  # noqa: E731
    group = lambda tr: {"group": tr.group_name} if cmp.group_by else {}  # noqa: E731
    return {
        "made_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reproduce": "python -m service.submit spec.yaml",
        "report_command": command,
        "sweep": {"id": view.id, "name": view.name, "state": view.state, "trials": view.n_trials,
                  "attempts": view.attempts, "created_at": view.created_at, "started_at": view.started_at,
                  "finished_at": view.finished_at},
        "mlflow": {"tracking_uri": shown, "experiment_name": spec.name, "experiment_id": view.mlflow_experiment_id,
                   "parent_run_id": view.mlflow_parent_run_id},
        "published": spec.published.model_dump() if spec.published else None,
        "group_by": cmp.group_by,
        "trials": [{"run_id": tr.run_id, "trial_id": tr.trial_id, "rule": tr.rule, "seed": tr.seed,
                    "dataset": tr.dataset, **group(tr), "status": tr.status, **tr.swept,
                    "epochs": fin(tr, "epochs"), "best_epoch": fin(tr, "best_epoch"),
                    "best_valid_accuracy": fin(tr, "best_valid_accuracy"),
                    "test_accuracy_at_best_valid": fin(tr, "test_accuracy_at_best_valid"),
                    "seconds_per_epoch": fin(tr, "seconds_per_epoch"),
                    "train_seconds": tr.train_seconds}
                   for tr in sorted(cmp.trials, key=lambda t: (t.rule, t.group, t.seed, t.run_id))],
        "machine": machine,
        # Efficiency (epoch seconds over cores x wall seconds) and per-trial overhead, as the
        # sweep logged them on its parent run; None for sweeps that predate them.
        "timing": cmp.timing,
        "table": "comparison.csv",
    }


def markdown_document(view: SweepView, spec, cmp, shown: str, plots: list[Path], md_path: Path,
                      command: str, heading: bool = True) -> str:
    """The report as Markdown; plot links are relative to ``md_path``. Without ``heading`` it is a
    section to put under a heading of the host document's own."""
    now = datetime.now(timezone.utc)
    rel = lambda p: os.path.relpath(p, md_path.parent)  # noqa: E731
    lines = [f"## Sweep results: {spec.name}", ""] if heading else []
    lines += [
        f"- sweep: `{view.id}` ({view.state}; {view.n_trials} trials; metric `{cmp.metric}`, mode `{cmp.mode}`)",
        f"- MLflow: experiment `{view.mlflow_experiment_id}`, parent run `{view.mlflow_parent_run_id}` ({shown})",
        f"- made {now:%Y-%m-%d %H:%M} UTC with `{command}`",
        "",
        cmp.to_markdown().rstrip(),
        "",
    ]
    captions = {"learning_curves.png": "Validation curve per rule (mean ± std over seeds)",
                "angle_bp.png": "Final angle to the backprop update per layer",
                "published.png": "Test figure at the best validation epoch per seed, and the published one"}
    for p in plots:
        lines += [f"![{captions.get(p.name, p.stem)}]({rel(p)})", ""]
    hint = mlflow_ui_hint(view.model_copy(update={"mlflow_tracking_uri": shown}))
    if hint:
        lines += [f"MLflow UI: {hint}", ""]
    return "\n".join(lines)


def splice(path: Path, name: str, section: str) -> None:
    """Replace what lies between ``<!-- report:NAME:start -->`` and ``<!-- report:NAME:end -->``
    in ``path`` (a README, say) with ``section``."""
    start, end = f"<!-- report:{name}:start -->", f"<!-- report:{name}:end -->"
    try:
        text = path.read_text()
    except OSError as e:
        raise ReportError(f"--into: cannot read {path}: {e.strerror or e}", 2) from None
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ReportError(f"--into: {path} has no '{start}' ... '{end}' lines to put the report between", 2)
    path.write_text(text[:i + len(start)] + "\n" + section.strip() + "\n" + text[j:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")  # before MLflow sets it itself
    p = argparse.ArgumentParser(prog="python -m service.report", description="Compare the rules of a sweep.")
    p.add_argument("id", help="the sweep id")
    p.add_argument("--markdown", metavar="PATH", help="also write the table and plot links to this Markdown file")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--outdir", metavar="DIR", help="where to write the plots and tables "
                                                   "(default $SWEEP_DATA_DIR/reports/<id>/)")
    p.add_argument("--service", metavar="URL", help="the API (default $SWEEP_SERVICE_URL; else the local queue)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow (default: the one the sweep logged to)")
    p.add_argument("--spec", metavar="PATH", help="report with this spec instead of the stored one; it must "
                                                  "describe the same trials (it may add published figures)")
    p.add_argument("--into", metavar="FILE", help="also put the Markdown section into FILE, between the lines "
                                                  "<!-- report:NAME:start --> and <!-- report:NAME:end --> "
                                                  "(NAME: the spec's name)")
    args = p.parse_args(argv)

    from service.settings import load

    settings = load()
    try:
        with open_sweeps(settings, args.service) as src:
            view = src.get(args.id)
            spec_yaml = src.spec(args.id)
        report_spec = None
        if args.spec:
            try:
                report_spec = Path(args.spec).read_text()
            except OSError as e:
                raise ReportError(f"--spec: cannot read {args.spec}: {e.strerror or e}", 2) from None
        cmp, spec, uri = build(view, spec_yaml, args.tracking_uri, report_spec)
        spec_yaml = report_spec or spec_yaml  # the record's spec: the one the report used
        if not cmp.rows:
            raise ReportError(f"{view.id}: no trial runs under parent run {view.mlflow_parent_run_id} in {uri}")
        outdir = Path(args.outdir) if args.outdir else settings.data_dir / "reports" / view.id
        # Paths in the command as the reader's checkout has them, not as this machine does.
        command = "python -m service.report " + shlex.join(shown_path(a) if os.path.isabs(a) else a for a in argv)
        if args.tracking_uri:
            set_by_user = True
        else:
            from worker.lifecycle import SweepFolder

            started = SweepFolder(settings.data_dir, view.id).started() or {}
            set_by_user = started.get("tracking_uri_set_by_user",
                                      True if user_uri == uri else None)
        shown = shown_uri(uri, set_by_user)
        try:
            plots = write_outputs(cmp, outdir.resolve(), record(view, spec, cmp, shown, command), spec_yaml)
        except OSError as e:
            raise ReportError(f"cannot write to {outdir}: {e.strerror or e}", 2) from None
        md_path = None
        if args.markdown:
            md_path = Path(args.markdown).resolve()
            try:
                md_path.parent.mkdir(parents=True, exist_ok=True)
                md_path.write_text(markdown_document(view, spec, cmp, shown, plots, md_path, command))
            except OSError as e:
                raise ReportError(f"cannot write {md_path}: {e.strerror or e}", 2) from None
        if args.into:
            into = Path(args.into).resolve()
            splice(into, spec.name, markdown_document(view, spec, cmp, shown, plots, into, command, heading=False))
    except ServiceError as e:
        print(f"service.report: {e}", file=sys.stderr)
        return 2 if e.is_bad_input else 1
    except ReportError as e:
        print(f"service.report: {e}", file=sys.stderr)
        return e.code

    if args.json:
        print(json.dumps({
            "sweep_id": view.id, "name": view.name, "state": view.state,
            "tracking_uri": uri, "experiment_id": view.mlflow_experiment_id,
            "parent_run_id": view.mlflow_parent_run_id, "metric": cmp.metric, "mode": cmp.mode,
            "rows": cmp.rows, "table_markdown": cmp.to_markdown(), "timing": cmp.timing,
            "outdir": str(outdir.resolve()), "plots": [str(x) for x in plots],
            "markdown": str(md_path) if md_path else None,
        }, indent=2, default=str))
        return 0
    from rich.console import Console

    from service.status import comparison_view

    console = Console()
    console.print(f"[bold]{view.id}[/] {view.name} ({view.state}): {cmp.metric} ({cmp.mode}) per rule, "
                  f"MLflow experiment {view.mlflow_experiment_id}, parent run {view.mlflow_parent_run_id} ({shown})")
    console.print(comparison_view(cmp.rows, console))
    pub = published_line(cmp)
    if pub:
        console.print(pub, highlight=False)
    timing = cmp.timing_line()
    if timing:
        console.print(timing, highlight=False)
    console.print(f"tables and plots (the full table: comparison.md): {shown_path(outdir)}/")
    for x in plots:
        console.print(f"  {shown_path(x)}")
    if md_path:
        console.print(f"markdown: {shown_path(md_path)}")
    return 0


def published_line(cmp) -> str | None:
    """The published figures beside ours, on one line (the terminal table has no room for them)."""
    pub = cmp.published
    if not pub:
        return None
    as_error = pub["metric"] == "test_error"
    parts = []
    for r in cmp.rows:
        name = r.get("group", r["rule"])
        ref = cmp.published_value(name)
        if ref is None:
            continue
        if r["test_mean"] is None:
            ours = "–"
        elif as_error:
            ours = f"{100 * (1 - r['test_mean']):.2f}% ± {100 * (r['test_std'] or 0):.2f}"
        else:
            ours = f"{r['test_mean']:.4f} ± {r['test_std'] or 0:.4f}"
        parts.append(f"{name} {100 * ref:.2f}%" if as_error else f"{name} {ref:.4f}")
        parts[-1] += f" (ours {ours})"
    return f"published {pub['metric'].replace('_', ' ')} ({pub['source']}): " + ", ".join(parts) if parts else None


if __name__ == "__main__":
    raise SystemExit(main())

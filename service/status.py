"""Show sweeps: ``python -m service.status [ID] [--json] [--service URL] [--state S] [--limit N]``.

Without ID: a table of recent sweeps (id, name, state, progress, best per rule, age). With ID: the
sweep in detail, with its MLflow experiment and parent run and where to see them in the UI.

Talks to the API when ``--service URL`` or SWEEP_SERVICE_URL is given, else reads the local queue
database (embedded mode). Exit codes: 0 ok, 2 bad input (unknown sweep or state), 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

from rich import box
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from service.client import ServiceError, SweepClient, open_sweeps
from service.views import SweepView, mlflow_ui_hint
from tp_engine.status import TrialStatus
from worker.lifecycle import SweepState

STATE_STYLE = {SweepState.QUEUED: "cyan", SweepState.RUNNING: "yellow", SweepState.SUCCEEDED: "green",
               SweepState.FAILED: "red", SweepState.CANCELLED: "magenta"}


def age(ts: datetime | None, now: datetime | None = None) -> str:
    if ts is None:
        return "–"
    s = max(0, int(((now or datetime.now(timezone.utc)) - ts).total_seconds()))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


def duration(a: datetime | None, b: datetime | None) -> str:
    if a is None:
        return "–"
    return age(a, b or datetime.now(timezone.utc))


def progress_text(v: SweepView) -> str:
    p = v.progress or {}
    total = p.get("total") or v.n_trials
    done = p.get("done")
    if done is None:
        return f"0/{total}" if total else "–"
    extra = []
    if p.get("running"):
        extra.append(f"{p['running']} running")
    if p.get("errored"):
        extra.append(f"{p['errored']} errored")
    return f"{done}/{total}" + (f" ({', '.join(extra)})" if extra else "")


def best_text(v: SweepView) -> str:
    best = (v.progress or {}).get("best") or {}
    return ", ".join(f"{rule} {value:.4f}" if isinstance(value, (int, float)) else f"{rule} {value}"
                     for rule, value in best.items()) or "–"


COMPARISON_TITLE = "Comparison of the rules (mean ± std over seeds of each rule's best config)"


def _pm(mean, std) -> str:
    return "–" if mean is None else f"{mean:.4f} ± {std or 0:.4f}"


def _num(v, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def trials_text(row: dict) -> str:
    """'6', or '6 (2 diverged)' when not every trial completed."""
    counts = dict(part.split(":", 1) for part in (row.get("statuses") or "").split() if ":" in part)
    other = [f"{n} {status.replace('_', ' ')}" for status, n in counts.items() if status != TrialStatus.COMPLETED]
    return str(row.get("trials", "?")) + (f" ({', '.join(other)})" if other else "")


def _label(row: dict, group_by: list[str]) -> str:
    return " · ".join([str(row["rule"]), *(str(row.get(g, "?")) for g in group_by)])


def comparison_view(rows: list[dict], console: Console, title: str | None = None):
    """The rule comparison (rows of ``worker.report.Comparison``) as the terminal can show it: a
    table when it fits at its natural width, else two lines per rule (nothing cut to "vali…")."""
    from rich.measure import Measurement
    from rich.text import Text

    if not rows:
        return Text("no trials to compare yet")
    metric = rows[0].get("metric") or "metric"
    # Grouped comparisons name their grouping parameters (comma-separated) in every row.
    group_by = [g for g in str(rows[0].get("group_by") or "").split(",") if g]
    t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)
    for col in ("rule", *group_by, f"{metric} (mean ± std)", "test acc", "best", "config", "s/epoch", "trials"):
        t.add_column(col, no_wrap=True)
    for r in rows:
        t.add_row(str(r["rule"]), *(str(r.get(g, "?")) for g in group_by), _pm(r["metric_mean"], r["metric_std"]),
                  _pm(r["test_mean"], r["test_std"]), _num(r["best_trial_metric"], 4), r["best_config"] or "defaults",
                  _num(r["seconds_per_epoch"], 2), trials_text(r))
    # Measured as if the terminal had no edge: the table's own width, not the one it would squeeze into.
    natural = Measurement.get(console, console.options.update_width(10_000), t).maximum
    if console.width >= 100 and natural <= console.width:
        return t
    # Narrow: a vertical layout, one block of two lines per rule.
    lines = Text(f"{title}\n" if title else "")
    for r in rows:
        config = f" · {r['best_config']}" if r["best_config"] else ""
        lines.append(_label(r, group_by), style="bold")
        lines.append(f"{config}   trials {trials_text(r)}, {_num(r['seconds_per_epoch'], 2)} s/epoch\n")
        lines.append(f"  {metric} {_pm(r['metric_mean'], r['metric_std'])} (best {_num(r['best_trial_metric'], 4)})"
                     f"   test acc {_pm(r['test_mean'], r['test_std'])}\n")
    return lines


def sweeps_table(views: list[SweepView]) -> Table:
    t = Table(box=box.SIMPLE_HEAVY, header_style="bold")
    for col in ("id", "name", "state", "progress", "best per rule", "age"):
        t.add_column(col, no_wrap=col in ("id", "state", "age"), overflow="fold")
    for v in views:
        state = v.state + (" (cancelling)" if v.cancel_requested and v.state == SweepState.RUNNING else "")
        t.add_row(v.id, v.name, f"[{STATE_STYLE.get(v.state, '')}]{state}[/]", progress_text(v),
                  best_text(v), age(v.created_at))
    return t


def detail_table(v: SweepView, ray_job: bool = True) -> Table:
    """``ray_job``: name the Ray job of the last attempt (the service dispatches sweeps as Ray jobs;
    an embedded run has none)."""
    from service.dispatcher import submission_id

    t = Table(box=box.SIMPLE, show_header=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")  # long paths and URIs break across lines instead of ending in "…"
    rows = [
        ("id", v.id),
        ("name", v.name),
        ("state", f"[{STATE_STYLE.get(v.state, '')}]{v.state}[/]"
                  + (" (cancel requested)" if v.cancel_requested and not v.is_terminal else "")),
        ("priority", str(v.priority)),
        ("created", f"{v.created_at:%Y-%m-%d %H:%M:%S} UTC ({age(v.created_at)} ago)"),
        ("started", f"{v.started_at:%Y-%m-%d %H:%M:%S} UTC" if v.started_at else "–"),
        ("finished", f"{v.finished_at:%Y-%m-%d %H:%M:%S} UTC" if v.finished_at else "–"),
        ("run time", duration(v.started_at, v.finished_at)),
        ("attempts", str(v.attempts) + (f" (Ray job {submission_id(v.id, v.attempts)})" if v.attempts and ray_job else "")),
        ("trials", progress_text(v) if v.progress else str(v.n_trials or "–")),
        ("best per rule", best_text(v)),
        ("MLflow", v.mlflow_tracking_uri or "–"),
        ("experiment", v.mlflow_experiment_id or "–"),
        ("parent run", v.mlflow_parent_run_id or "–"),
    ]
    hint = mlflow_ui_hint(v)
    if hint:
        rows.append(("MLflow UI", hint))
    if v.result:
        rows.append(("result", f"{v.result.get('state')} {json.dumps(v.result.get('trial_status', {}))}"))
    if v.error:
        rows.append(("error", v.error))
    for k, val in rows:
        t.add_row(k, val)
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.status", description="Show sweeps.")
    p.add_argument("id", nargs="?", help="a sweep id; without it, recent sweeps")
    p.add_argument("--json", action="store_true", help="print JSON (SweepView, or {\"sweeps\": [...]})")
    p.add_argument("--service", metavar="URL", help="the API (default $SWEEP_SERVICE_URL; else the local queue)")
    p.add_argument("--state", choices=[s.value for s in SweepState])
    p.add_argument("--limit", type=int, default=20, help="sweeps to list (default 20)")
    args = p.parse_args(argv)
    if args.limit < 1:
        p.error("--limit must be >= 1")

    from service.settings import load

    console = Console()
    try:
        with open_sweeps(load(), args.service) as src:
            if args.id:
                v = src.get(args.id)
                if args.json:
                    print(v.model_dump_json(indent=2))
                    return 0
                console.print(detail_table(v, ray_job=isinstance(src, SweepClient)))
                result = v.result or {}
                if result.get("table"):
                    console.print(comparison_view(result["table"], console, COMPARISON_TITLE))
                elif result.get("table_markdown"):
                    console.print(Markdown(result["table_markdown"]))
                return 0
            views = src.list(args.state, args.limit)
            if args.json:
                print(json.dumps({"sweeps": [v.model_dump(mode="json") for v in views]}, indent=2))
                return 0
            if not views:
                console.print(f"no sweeps{f' in state {args.state}' if args.state else ''} ({src.base_url})")
                return 0
            console.print(sweeps_table(views))
            return 0
    except ServiceError as e:
        print(f"service.status: {e}", file=sys.stderr)
        return 2 if e.is_bad_input else 1


if __name__ == "__main__":
    raise SystemExit(main())

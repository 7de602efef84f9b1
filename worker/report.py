"""The comparison of propagation rules that a sweep leaves on its parent run: a table (CSV and
Markdown) with mean and std of the spec's metric over seeds per rule, the best trial per rule, and
plots (validation accuracy against epoch; final angle to backprop per layer).

Trials are compared per rule, or, when the spec names grid parameters to group by (``report:
{group_by: [dataset]}``), per rule and value of those parameters: a *group*, named
``rule/value...`` (``ddtp_linear/fashion_mnist``). Rules come in the rule registry's order."""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from worker import tracking

# Keys of a child run's params that do not define "the same configuration" across seeds.
_NOT_CONFIG = {"seed"}


@dataclass
class TrialRow:
    run_id: str
    trial_id: str
    rule: str
    seed: int
    status: str
    config_key: str
    swept: dict[str, str]
    metrics: dict[str, float]
    machine: dict[str, str] = field(default_factory=dict)  # the trial's machine.* tags
    train_seconds: float = 0.0  # summed epoch times (a resumed trial's wall clock has a pause)
    dataset: str = ""
    group: tuple[str, ...] = ()  # the values of the spec's group_by parameters

    @property
    def group_name(self) -> str:
        return "/".join((self.rule, *self.group))


@dataclass
class Comparison:
    metric: str
    mode: str
    published: dict[str, Any] | None = None  # {"source", "metric", "values": {rule or group: value}}
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per group
    trials: list[TrialRow] = field(default_factory=list)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # group -> {epoch, mean, lo, hi}
    angles: dict[str, dict[int, float]] = field(default_factory=dict)  # group -> layer -> degrees
    tests: dict[str, list[float]] = field(default_factory=dict)  # group -> test acc @ best valid, per seed
    group_by: list[str] = field(default_factory=list)  # grid parameters grouped by, besides the rule
    groups: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # group -> (rule, values)
    timing: dict[str, Any] | None = None  # sweep_timing(): efficiency and per-trial overhead

    def timing_line(self) -> str | None:
        """The sweep's efficiency and per-trial overhead in a sentence (None for sweeps that
        predate these figures)."""
        t = self.timing
        if not t or t.get("efficiency") is None:
            return None
        runs = f"{t['runs']} runs of the sweep" if t["runs"] > 1 else "Tune's wall"
        line = (f"Sweep efficiency {t['efficiency']:.2f}: {t['train_s']:.0f} s of epochs on {t['cores']:g} cores "
                f"in {t['wall_s']:.0f} s ({runs})")
        if t.get("trial_overhead_median_s") is not None:
            line += (f"; per-trial overhead (all but epochs) {t['trial_overhead_median_s']:.1f} s median "
                     f"over {t['trials_timed']} trials")
        return line + "."

    def published_value(self, group: str) -> float | None:
        """The published figure of a group: keyed by the group (``dtp/mnist``), else by its rule."""
        values = (self.published or {}).get("values") or {}
        return values[group] if group in values else values.get(self.groups.get(group, (group,))[0])

    def to_markdown(self) -> str:
        cols = ["rule", *self.group_by, "trials", "seeds", "best config", f"{self.metric} (mean ± std)",
                "test acc @ best valid (mean ± std)", "best trial", "epochs", "s/epoch (median)", "train s", "statuses"]
        pub = self.published
        at = 6 + len(self.group_by)  # where the published columns go: after our test accuracy
        if pub:
            cols[at:at] = ["test error (ours)", f"published {pub['metric'].replace('_', ' ')}"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            cells = [
                f"`{r['rule']}`", *(str(r[g]) for g in self.group_by), str(r["trials"]), str(r["seeds"]),
                r["best_config"] or "(defaults)",
                _pm(r["metric_mean"], r["metric_std"]), _pm(r["test_mean"], r["test_std"]),
                _num(r["best_trial_metric"]), _num(r["epochs"], 0), _num(r["seconds_per_epoch"], 2),
                _num(r["train_seconds"], 0), r["statuses"],
            ]
            if pub:
                ours = "–" if r["test_mean"] is None else f"{100 * (1 - r['test_mean']):.2f}% ± {100 * (r['test_std'] or 0):.2f}"
                ref = self.published_value(r.get("group", r["rule"]))
                ref_s = "–" if ref is None else (f"{100 * ref:.2f}%" if pub["metric"] == "test_error" else f"{ref:.4f}")
                cells[at:at] = [ours, ref_s]
            lines.append("| " + " | ".join(cells) + " |")
        if pub:
            lines.append(f"\nPublished figures: {pub['source']}. Test error is read at each trial's epoch of best "
                         "validation accuracy.")
        timing = self.timing_line()
        if timing:
            lines.append(f"\n{timing}")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        if not self.rows:
            return ""
        w = csv.DictWriter(buf, fieldnames=list(self.rows[0].keys()))
        w.writeheader()
        w.writerows(self.rows)
        return buf.getvalue()


def _num(v: Any, digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pm(m: Any, s: Any) -> str:
    return "–" if m is None else f"{m:.4f} ± {(s or 0.0):.4f}"


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# A sweep's timing, on its parent run: one value per run of the sweep (step 1, 2, ... when it was
# resumed), per-trial overheads at step run * TRIAL_STEP + n. Written by worker.sweep (log_timing).
TIMING_PREFIX = "sweep/"
TIMING_METRICS = ("wall_s", "cores", "train_s", "efficiency", "trial_overhead_median_s")
TRIAL_OVERHEAD = TIMING_PREFIX + "trial_overhead_s"
TRIAL_STEP = 100_000


def log_timing(c: MlflowClient, parent_run_id: str, summary: dict[str, Any]) -> None:
    """Log one run of a sweep's timing (worker.sweep.TrialTimer.summary) on its parent run."""
    import time

    from mlflow.entities import Metric

    attempt = len(c.get_metric_history(parent_run_id, TIMING_PREFIX + "wall_s")) + 1
    ts = int(time.time() * 1000)
    ms = [Metric(TIMING_PREFIX + k, float(summary[k]), ts, attempt) for k in TIMING_METRICS
          if isinstance(summary.get(k), (int, float)) and math.isfinite(summary[k])]
    ms += [Metric(TRIAL_OVERHEAD, float(v), ts, attempt * TRIAL_STEP + n)
           for n, v in enumerate(summary.get("trial_overhead_s", []))]
    for i in range(0, len(ms), 500):
        c.log_batch(parent_run_id, metrics=ms[i : i + 500])


def sweep_timing(c: MlflowClient, parent_run_id: str) -> dict[str, Any] | None:
    """Efficiency (epoch seconds over cores x Tune's wall seconds, over every run of the sweep) and
    the median per-trial overhead (everything but epochs); None if the sweep did not log them."""
    hist = {k: {m.step: m.value for m in c.get_metric_history(parent_run_id, TIMING_PREFIX + k)}
            for k in ("wall_s", "cores", "train_s")}
    walls = hist["wall_s"]
    if not walls:
        return None
    capacity = sum(w * hist["cores"].get(step, 0.0) for step, w in walls.items())
    train = sum(hist["train_s"].values())
    overheads = [m.value for m in c.get_metric_history(parent_run_id, TRIAL_OVERHEAD)]
    return {
        "runs": len(walls),
        "wall_s": sum(walls.values()),
        "cores": max(hist["cores"].values(), default=0.0),
        "train_s": train,
        "efficiency": train / capacity if capacity > 0 else None,
        "trials_timed": len(overheads),
        "trial_overhead_median_s": statistics.median(overheads) if overheads else None,
    }


def child_runs(c: MlflowClient, exp_id: str, parent_run_id: str):
    flt = f"tags.`{tracking.TAG_PARENT}` = '{parent_run_id}'"
    return c.search_runs([exp_id], filter_string=flt, max_results=5000)


def rule_order() -> list[str]:
    """Rules in the registry's order (the order tables list them in)."""
    from tp_engine.rules import RULES

    return list(RULES)


def compare(c: MlflowClient, exp_id: str, parent_run_id: str, metric: str = "valid_accuracy",
            mode: str = "max", swept: list[str] | None = None,
            published: dict[str, Any] | None = None, group_by: list[str] | None = None,
            group_values: dict[str, list[Any]] | None = None) -> Comparison:
    """Gather the child runs of a sweep and compare the rules.

    Trials are grouped by rule and by the values of the ``group_by`` parameters (listed in the
    order of ``group_values``, then rules in registry order). Within a group, trials are split by
    configuration (all params but the seed); the configuration with the best mean ``metric`` over
    seeds is the group's entry. Selection uses the validation metric only; the test accuracy shown
    is each trial's test accuracy at its best validation epoch."""
    group_by = [g for g in (group_by or []) if g != "rule"]
    swept = [p for p in (swept or []) if p != "rule" and p not in group_by]
    cmp = Comparison(metric, mode, published, group_by=group_by)
    cmp.timing = sweep_timing(c, parent_run_id)
    for run in child_runs(c, exp_id, parent_run_id):
        p, t, m = run.data.params, run.data.tags, dict(run.data.metrics)
        seconds = _history(c, run.info.run_id, "seconds_per_epoch")
        if "final/epochs" not in m:
            m.update(_summary_from_history(c, run.info.run_id, seconds))
        key = json.dumps({k: v for k, v in sorted(p.items()) if k not in _NOT_CONFIG})
        cmp.trials.append(TrialRow(
            run.info.run_id, t.get(tracking.TAG_TRIAL, ""), t.get(tracking.TAG_RULE, p.get("rule", "?")),
            int(p.get("seed", 0)), t.get(tracking.TAG_STATUS, "?"), key,
            {k: p[k] for k in swept if k in p}, m,
            {k.removeprefix(tracking.MACHINE_PREFIX): v for k, v in t.items() if k.startswith(tracking.MACHINE_PREFIX)},
            sum(seconds.values()), t.get(tracking.TAG_DATASET, p.get("dataset", "")),
            tuple(p.get(g, "?") for g in group_by),
        ))
    better = max if mode == "max" else min
    by_group: dict[str, list[TrialRow]] = defaultdict(list)
    for tr in cmp.trials:
        by_group[tr.group_name].append(tr)
        cmp.groups[tr.group_name] = (tr.rule, tr.group)
    rules = rule_order()
    # MLflow params are strings: order a group's values by where they stand in the spec's grid.
    where = {g: [str(v) for v in (group_values or {}).get(g, [])] for g in group_by}
    index = lambda order, x: (order.index(x) if x in order else len(order), x)  # noqa: E731

    def sort_key(name: str):
        rule, values = cmp.groups[name]
        return (*(index(where[g], v) for g, v in zip(group_by, values)), index(rules, rule))

    for name in sorted(by_group, key=sort_key):
        trials = by_group[name]
        rule, values = cmp.groups[name]
        configs: dict[str, list[TrialRow]] = defaultdict(list)
        for tr in trials:
            configs[tr.config_key].append(tr)

        def score(g: list[TrialRow]) -> float:
            mean, _ = _mean_std([_final(tr, metric) for tr in g])
            return mean if mean is not None else (-math.inf if mode == "max" else math.inf)

        best_group = better(configs.values(), key=score)
        vals = [_final(tr, metric) for tr in best_group]
        tests = [tr.metrics.get("final/test_accuracy_at_best_valid", tr.metrics.get("test_accuracy")) for tr in best_group]
        mean, std = _mean_std(vals)
        tmean, tstd = _mean_std(tests)
        best_trial = better(trials, key=lambda tr: _final(tr, metric) if _final(tr, metric) is not None else (-math.inf if mode == "max" else math.inf))
        spe = [tr.metrics.get("final/seconds_per_epoch") for tr in best_group]
        eps = [tr.metrics.get("final/epochs") for tr in best_group]
        counts: dict[str, int] = defaultdict(int)
        for tr in trials:
            counts[tr.status] += 1
        s_mean = _mean_std(spe)[0]
        e_mean = _mean_std(eps)[0]
        # Ungrouped rows keep their original keys (reports and CSVs made before grouping existed).
        grouping = {**dict(zip(group_by, values)), "group": name, "group_by": ",".join(group_by)} if group_by else {}
        cmp.rows.append({
            "rule": rule,
            **grouping,
            "trials": len(trials),
            "seeds": len({tr.seed for tr in best_group}),
            "best_config": ", ".join(f"{k}={v}" for k, v in best_group[0].swept.items()),
            "metric": metric,
            "metric_mean": mean,
            "metric_std": std,
            "test_mean": tmean,
            "test_std": tstd,
            "best_trial_run_id": best_trial.run_id,
            "best_trial_metric": _final(best_trial, metric),
            "epochs": e_mean,
            "seconds_per_epoch": s_mean,
            "train_seconds": _mean_std([tr.train_seconds for tr in best_group])[0],
            "statuses": " ".join(f"{k}:{v}" for k, v in sorted(counts.items())),
        })
        cmp.curves[name] = _curve(c, best_group, metric)
        cmp.angles[name] = _angles(best_group)
        cmp.tests[name] = [t for t in tests if t is not None and math.isfinite(t)]
    return cmp


def compare_sweep(c: MlflowClient, exp_id: str, parent_run_id: str, spec) -> Comparison:
    """``compare`` with what a sweep spec says: its metric, mode, swept parameters, the grid
    parameters to group by and the published figures to show beside ours."""
    group_by = list(spec.report.group_by) if getattr(spec, "report", None) else []
    grid = spec.grid_params()
    return compare(c, exp_id, parent_run_id, spec.search.metric, spec.search.mode, list(spec.parameters),
                   spec.published.model_dump() if spec.published else None, group_by,
                   {g: grid.get(g, []) for g in group_by})


def _summary_from_history(c: MlflowClient, run_id: str, seconds: dict[int, float]) -> dict[str, float]:
    """For a trial that has not finished (interrupted, or still running): the same summary
    numbers the engine gives at the end, computed from its per-epoch history so far."""
    hist = {key: _history(c, run_id, key) for key in ("valid_accuracy", "test_accuracy")}
    hist["seconds_per_epoch"] = seconds
    out: dict[str, float] = {}
    if hist["seconds_per_epoch"]:
        out["final/epochs"] = float(len(hist["seconds_per_epoch"]))
        out["final/seconds_per_epoch"] = statistics.median(hist["seconds_per_epoch"].values())
    if hist["valid_accuracy"]:
        best = max(hist["valid_accuracy"], key=lambda e: hist["valid_accuracy"][e])
        out["final/best_valid_accuracy"] = hist["valid_accuracy"][best]
        out["final/best_epoch"] = float(best)
        if best in hist["test_accuracy"]:
            out["final/test_accuracy_at_best_valid"] = hist["test_accuracy"][best]
    return out


def _history(c: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """epoch -> value. A trial resumed from its checkpoint may have logged the interrupted epoch
    twice; the later value is the one its training continued from."""
    return {int(h.step): h.value for h in sorted(c.get_metric_history(run_id, key), key=lambda h: h.timestamp)}


def _final(tr: TrialRow, metric: str) -> float | None:
    """The trial's value of ``metric``: at its best epoch for valid_accuracy, else the last one."""
    if metric == "valid_accuracy" and "final/best_valid_accuracy" in tr.metrics:
        return tr.metrics["final/best_valid_accuracy"]
    return tr.metrics.get(f"final/{metric}", tr.metrics.get(metric))


def _curve(c: MlflowClient, trials: list[TrialRow], metric: str) -> dict[str, list[float]]:
    key = "valid_accuracy" if any("valid_accuracy" in t.metrics for t in trials) else "valid_loss"
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for tr in trials:
        for step, value in _history(c, tr.run_id, key).items():
            per_epoch[step].append(value)
    epochs = sorted(per_epoch)
    out: dict[str, list[float]] = {"metric": key, "epoch": epochs, "mean": [], "lo": [], "hi": []}  # type: ignore[dict-item]
    for e in epochs:
        mean, std = _mean_std(per_epoch[e])
        out["mean"].append(mean)
        out["lo"].append(mean - std)
        out["hi"].append(mean + std)
    return out


def _angles(trials: list[TrialRow]) -> dict[int, float]:
    per_layer: dict[int, list[float]] = defaultdict(list)
    for tr in trials:
        for k, v in tr.metrics.items():
            if k.startswith("angle_bp/"):
                per_layer[int(k.split("/")[1])].append(v)
    return {l: statistics.fmean(v) for l, v in sorted(per_layer.items())}


def _panels(cmp: Comparison) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(panel title, [(line label, group)])]: one panel per value of the group_by parameters,
    a line per rule; ungrouped, one panel with a line per rule."""
    panels: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for name in cmp.curves:  # in table order
        rule, values = cmp.groups.get(name, (name, ()))
        panels.setdefault(values, []).append((rule, name))
    return [(", ".join(f"{g}={v}" for g, v in zip(cmp.group_by, values)), lines) for values, lines in panels.items()]


def _subplots(n: int):
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot(cmp: Comparison, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")

    paths = []
    panels = _panels(cmp)
    # One colour per rule in every panel, even where a panel lacks some rule.
    colour = {rule: f"C{i % 10}" for i, rule in enumerate(dict.fromkeys(r for _, ls in panels for r, _ in ls))}
    metric_name = next((cv["metric"] for cv in cmp.curves.values()), "valid_accuracy")
    fig, axes = _subplots(max(len(panels), 1))
    for ax, (title, lines) in zip(axes, panels):
        for label, name in lines:
            cv = cmp.curves[name]
            if not cv["epoch"]:
                continue
            ax.plot(cv["epoch"], cv["mean"], marker="o", ms=3, label=label, color=colour[label])
            ax.fill_between(cv["epoch"], cv["lo"], cv["hi"], alpha=0.2, color=colour[label])
        _label(ax, "epoch", f"{metric_name} (mean ± std over seeds)", _title("Validation curve per rule", title))
    paths.append(_finish(fig, outdir / "learning_curves.png"))

    fig, axes = _subplots(max(len(panels), 1))
    for ax, (title, lines) in zip(axes, panels):
        for label, name in lines:
            angles = cmp.angles.get(name)
            if angles:
                ax.plot(list(angles), list(angles.values()), marker="o", label=label, color=colour[label])
        ax.axhline(90, color="gray", ls="--", lw=0.8)
        _label(ax, "layer", "angle to backprop update (degrees)", _title("Final angle to backprop per layer", title))
    paths.append(_finish(fig, outdir / "angle_bp.png"))
    if cmp.published and any(cmp.tests.values()):
        paths.append(_plot_published(cmp, outdir / "published.png"))
    return paths


def _title(what: str, panel: str) -> str:
    return f"{what}: {panel}" if panel else what


def _plot_published(cmp: Comparison, path: Path) -> Path:
    """Per rule (or group): each seed's test figure at its best validation epoch, their mean ±
    std, and the published figure beside them."""
    import matplotlib.pyplot as plt

    pub = cmp.published or {}
    as_error = pub.get("metric") == "test_error"
    conv = (lambda acc: 100 * (1 - acc)) if as_error else (lambda acc: 100 * acc)  # noqa: E731
    groups = [g for g in cmp.tests if cmp.tests[g]]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.6 * len(groups)), 4))
    star_label = "published"  # on the first star only
    for i, group in enumerate(groups):
        ys = [conv(t) for t in cmp.tests[group]]
        mean, std = _mean_std(ys)
        ax.scatter([i - 0.12] * len(ys), ys, s=18, color="tab:blue", alpha=0.6,
                   label="ours, one seed" if i == 0 else None)
        ax.errorbar([i], [mean], yerr=[std or 0.0], fmt="o", color="tab:blue", capsize=4,
                    label="ours, mean ± std" if i == 0 else None)
        ref = cmp.published_value(group)
        if ref is not None:
            ax.scatter([i + 0.12], [100 * ref], marker="*", s=120, color="tab:red", label=star_label)
            star_label = None
    ax.set_xticks(range(len(groups)), groups, rotation=45 if cmp.group_by else 0,
                  ha="right" if cmp.group_by else "center")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    what = "test error (%)" if as_error else "test accuracy (%)"
    _label(ax, "rule/" + "/".join(cmp.group_by) if cmp.group_by else "rule", f"{what} at best validation epoch",
           "Ours against the published figure", integer_x=False)
    return _finish(fig, path)


def _label(ax, xlabel: str, ylabel: str, title: str, integer_x: bool = True) -> None:
    """Label one panel (integer x ticks for epochs and layers)."""
    from matplotlib.ticker import MaxNLocator

    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _finish(fig, path: Path) -> Path:
    """Save and close one figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def publish(c: MlflowClient, parent_run_id: str, cmp: Comparison, outdir: Path) -> list[Path]:
    """Write the table and plots to ``outdir`` and attach them to the parent run."""
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "comparison.md").write_text(cmp.to_markdown())
    (outdir / "comparison.csv").write_text(cmp.to_csv())
    paths = [outdir / "comparison.md", outdir / "comparison.csv", *plot(cmp, outdir)]
    for p in paths:
        c.log_artifact(parent_run_id, str(p), "comparison")
    return paths

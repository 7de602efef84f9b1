"""The comparison of propagation rules that a sweep leaves on its parent run: a table (CSV and
Markdown) with mean and std of the spec's metric over seeds per rule, the best trial per rule, and
plots (validation accuracy against epoch; final angle to backprop per layer)."""
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

RULE_ORDER = ["bp", "dtp", "rlstp", "lstp"]
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


@dataclass
class Comparison:
    metric: str
    mode: str
    published: dict[str, Any] | None = None  # {"source", "metric", "values": {rule: value}}
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per rule
    trials: list[TrialRow] = field(default_factory=list)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # rule -> {epoch, mean, lo, hi}
    angles: dict[str, dict[int, float]] = field(default_factory=dict)  # rule -> layer -> degrees
    tests: dict[str, list[float]] = field(default_factory=dict)  # rule -> test acc @ best valid, per seed

    def to_markdown(self) -> str:
        cols = ["rule", "trials", "seeds", "best config", f"{self.metric} (mean ± std)",
                "test acc @ best valid (mean ± std)", "best trial", "epochs", "s/epoch (median)", "train s", "statuses"]
        pub = self.published
        if pub:
            cols[6:6] = ["test error (ours)", f"published {pub['metric'].replace('_', ' ')}"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            cells = [
                f"`{r['rule']}`", str(r["trials"]), str(r["seeds"]), r["best_config"] or "(defaults)",
                _pm(r["metric_mean"], r["metric_std"]), _pm(r["test_mean"], r["test_std"]),
                _num(r["best_trial_metric"]), _num(r["epochs"], 0), _num(r["seconds_per_epoch"], 2),
                _num(r["train_seconds"], 0), r["statuses"],
            ]
            if pub:
                ours = "–" if r["test_mean"] is None else f"{100 * (1 - r['test_mean']):.2f}% ± {100 * (r['test_std'] or 0):.2f}"
                ref = pub["values"].get(r["rule"])
                ref_s = "–" if ref is None else (f"{100 * ref:.2f}%" if pub["metric"] == "test_error" else f"{ref:.4f}")
                cells[6:6] = [ours, ref_s]
            lines.append("| " + " | ".join(cells) + " |")
        if pub:
            lines.append(f"\nPublished figures: {pub['source']}. Test error is read at each trial's epoch of best "
                         "validation accuracy.")
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


def child_runs(c: MlflowClient, exp_id: str, parent_run_id: str):
    flt = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    return c.search_runs([exp_id], filter_string=flt, max_results=5000)


def compare(c: MlflowClient, exp_id: str, parent_run_id: str, metric: str = "valid_accuracy",
            mode: str = "max", swept: list[str] | None = None,
            published: dict[str, Any] | None = None) -> Comparison:
    """Gather the child runs of a sweep and compare the rules.

    Per rule, trials are grouped by configuration (all params but the seed); the configuration with
    the best mean ``metric`` over seeds is the rule's entry. Selection uses the validation metric
    only; the test accuracy shown is each trial's test accuracy at its best validation epoch."""
    swept = [p for p in (swept or []) if p != "rule"]
    cmp = Comparison(metric, mode, published)
    for run in child_runs(c, exp_id, parent_run_id):
        p, t, m = run.data.params, run.data.tags, dict(run.data.metrics)
        seconds = _history(c, run.info.run_id, "seconds_per_epoch")
        if "final/epochs" not in m:
            m.update(_summary_from_history(c, run.info.run_id, seconds))
        key = json.dumps({k: v for k, v in sorted(p.items()) if k not in _NOT_CONFIG})
        cmp.trials.append(TrialRow(
            run.info.run_id, t.get(tracking.TAG_TRIAL, ""), t.get("rule", p.get("rule", "?")),
            int(p.get("seed", 0)), t.get(tracking.TAG_STATUS, "?"), key,
            {k: p[k] for k in swept if k in p}, m,
            {k.removeprefix("machine."): v for k, v in t.items() if k.startswith("machine.")},
            sum(seconds.values()),
        ))
    better = max if mode == "max" else min
    by_rule: dict[str, list[TrialRow]] = defaultdict(list)
    for tr in cmp.trials:
        by_rule[tr.rule].append(tr)
    for rule in sorted(by_rule, key=lambda r: (RULE_ORDER.index(r) if r in RULE_ORDER else 99, r)):
        trials = by_rule[rule]
        groups: dict[str, list[TrialRow]] = defaultdict(list)
        for tr in trials:
            groups[tr.config_key].append(tr)

        def score(g: list[TrialRow]) -> float:
            mean, _ = _mean_std([_final(tr, metric) for tr in g])
            return mean if mean is not None else (-math.inf if mode == "max" else math.inf)

        best_group = better(groups.values(), key=score)
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
        cmp.rows.append({
            "rule": rule,
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
        cmp.curves[rule] = _curve(c, best_group, metric)
        cmp.angles[rule] = _angles(best_group)
        cmp.tests[rule] = [t for t in tests if t is not None and math.isfinite(t)]
    return cmp


def compare_sweep(c: MlflowClient, exp_id: str, parent_run_id: str, spec) -> Comparison:
    """``compare`` with what a sweep spec says: its metric, mode, swept parameters and the
    published figures to show beside ours."""
    return compare(c, exp_id, parent_run_id, spec.search.metric, spec.search.mode, list(spec.parameters),
                   spec.published.model_dump() if spec.published else None)


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


def plot(cmp: Comparison, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for rule, cv in cmp.curves.items():
        if not cv["epoch"]:
            continue
        ax.plot(cv["epoch"], cv["mean"], marker="o", ms=3, label=rule)
        ax.fill_between(cv["epoch"], cv["lo"], cv["hi"], alpha=0.2)
    metric_name = next((cv["metric"] for cv in cmp.curves.values()), "valid_accuracy")
    paths.append(_finish(fig, ax, outdir / "learning_curves.png", "epoch",
                         f"{metric_name} (mean ± std over seeds)", "Validation curve per rule"))

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for rule, angles in cmp.angles.items():
        if angles:
            ax.plot(list(angles), list(angles.values()), marker="o", label=rule)
    ax.axhline(90, color="gray", ls="--", lw=0.8)
    paths.append(_finish(fig, ax, outdir / "angle_bp.png", "layer", "angle to backprop update (degrees)",
                         "Final angle to backprop per layer"))
    if cmp.published and any(cmp.tests.values()):
        paths.append(_plot_published(cmp, outdir / "published.png"))
    return paths


def _plot_published(cmp: Comparison, path: Path) -> Path:
    """Per rule: each seed's test figure at its best validation epoch, their mean ± std, and the
    published figure beside them."""
    import matplotlib.pyplot as plt

    pub = cmp.published or {}
    as_error = pub.get("metric") == "test_error"
    conv = (lambda acc: 100 * (1 - acc)) if as_error else (lambda acc: 100 * acc)  # noqa: E731
    rules = [r for r in cmp.tests if cmp.tests[r]]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    star_label = "published"  # on the first star only
    for i, rule in enumerate(rules):
        ys = [conv(t) for t in cmp.tests[rule]]
        mean, std = _mean_std(ys)
        ax.scatter([i - 0.12] * len(ys), ys, s=18, color="tab:blue", alpha=0.6,
                   label="ours, one seed" if i == 0 else None)
        ax.errorbar([i], [mean], yerr=[std or 0.0], fmt="o", color="tab:blue", capsize=4,
                    label="ours, mean ± std" if i == 0 else None)
        ref = pub.get("values", {}).get(rule)
        if ref is not None:
            ax.scatter([i + 0.12], [100 * ref], marker="*", s=120, color="tab:red", label=star_label)
            star_label = None
    ax.set_xticks(range(len(rules)), rules)
    ax.set_xlim(-0.6, len(rules) - 0.4)
    what = "test error (%)" if as_error else "test accuracy (%)"
    return _finish(fig, ax, path, "rule", f"{what} at best validation epoch", "Ours against the published figure",
                   integer_x=False)


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, integer_x: bool = True) -> Path:
    """Label, save and close one plot (integer x ticks for epochs and layers)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
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

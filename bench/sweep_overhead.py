"""What a sweep costs on top of the training it runs: its efficiency and per-trial overhead.

The same 8 trials (4 rules x 2 seeds on a synthetic set) are run twice:

(a) through ``worker.sweep.run_sweep``: Ray Tune on a local Ray with 2 CPUs, logging to MLflow
    (a SQLite store in a temporary directory);
(b) one after the other in this process with ``tp_engine.train.train``: no Ray, no MLflow.

Measured: the wall time of each; the training time inside the trials (the sum of the per-epoch
``seconds_per_epoch``, read back from the MLflow metric histories); the import time of a trial
process (once, in a fresh interpreter, for information); and from these

    efficiency         = epoch seconds / (cores x wall seconds)      (goal >= 0.90)
    overhead per trial = (cores x wall seconds - epoch seconds) / n_trials   (a mean)

over two walls: ``run_sweep``'s (``efficiency_run_sweep``: also the parent run, the comparison and
its plots at the end) and Tune's (``efficiency``: what the sweep itself logs on its parent run,
``tuner.fit`` alone). The sweep's own per-trial figures (worker.sweep.TrialTimer: each trial's time
in its slot less its epochs) give ``trial_overhead_median_s`` (goal <= 3 s); versions of the code
before the TrialTimer have only the mean. Starting Ray is a per-sweep cost reported apart
(``ray_init_s``).

``--spec PATH`` runs a spec's own trials instead (say, ``configs/sweep.yaml``, the README's main
command: 24 MNIST trials two at a time), through the same ``run_sweep``, with no calibration and no
sequential run.

Usage::

    python bench/sweep_overhead.py                    # ~3 s trials (xor)
    python bench/sweep_overhead.py --trial-seconds 10
    python bench/sweep_overhead.py --long             # trials of >= 30 s (a 96-96 net)
    python bench/sweep_overhead.py --spec configs/sweep.yaml --no-sequential
    python bench/sweep_overhead.py --json --out results/bench/sweep_overhead.json

The epochs per trial are calibrated in-process first, so that one trial trains for about
``--trial-seconds``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_TRIALS = 8
CPUS = 2
RULES = ["bp", "lstp", "rlstp", "dtp"]
SEEDS = [0, 1]
GOAL_OVERHEAD_S = 3.0  # median per trial
GOAL_EFFICIENCY = 0.90
IMPORT_CMD = ("import time; t=time.time(); import mlflow, ray, tp_engine.train, worker.trainable; "
              "print(time.time()-t)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def base_config(dataset: str, hidden: list[int], epochs: int) -> dict:
    return {"dataset": dataset, "mode": "classification", "backend": "numpy", "hidden": hidden,
            "activation": "tanh", "epochs": epochs, "batch_size": 50, "diag_size": 200}


def make_spec(dataset: str, hidden: list[int], epochs: int):
    from worker.spec import SweepSpec

    return SweepSpec.from_dict({
        "name": "bench-sweep-overhead",
        "description": "bench/sweep_overhead.py",
        "base": base_config(dataset, hidden, epochs),
        "parameters": {"rule": {"distribution": "values", "values": RULES}},
        "search": {"method": "grid", "seeds": SEEDS, "max_concurrent_trials": CPUS},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
    })


def calibrate(dataset: str, hidden: list[int], trial_seconds: float) -> tuple[int, float]:
    """Epochs so that a trial trains for about ``trial_seconds`` (mean over the rules of the time
    of one epoch, measured in-process on epoch 2 so one-off compilation is left out)."""
    from tp_engine.config import TrialConfig
    from tp_engine.data import load_dataset
    from tp_engine.train import train

    per_epoch = []
    for rule in RULES:
        cfg = TrialConfig(**{**base_config(dataset, hidden, 2), "rule": rule})
        ds = load_dataset(cfg.dataset, seed=0)
        res = train(cfg, data=ds)
        per_epoch.append(res.history[-1]["seconds_per_epoch"])
    spe = statistics.fmean(per_epoch)
    return max(1, math.ceil(trial_seconds / spe)), spe


def measure_import() -> float:
    out = subprocess.run([sys.executable, "-c", IMPORT_CMD], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_tune(spec, workdir: Path) -> dict:
    import mlflow
    import ray

    from worker import tracking
    from worker.sweep import run_sweep

    uri = f"sqlite:///{workdir}/mlflow.db"
    c = mlflow.MlflowClient(uri)
    exp_id = c.create_experiment(spec.name, artifact_location=(workdir / "artifacts").as_uri())
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    t0 = time.perf_counter()
    for attempt in range(3):  # a loaded machine can exceed the raylet's 30 s to start
        try:
            ray.init(address="local", num_cpus=CPUS, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    ray_init_s = time.perf_counter() - t0
    try:
        t0, t_sweep = time.perf_counter(), time.time()
        result = run_sweep(spec, uri, str(workdir / "tune"), num_cpus=CPUS)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    timing = getattr(result, "timing", None) or {}  # the sweep's own figures (TrialTimer)
    runs = c.search_runs([exp_id], filter_string=f"tags.`{tracking.TAG_PARENT}` = '{result.parent_run_id}'",
                         max_results=1000)
    from worker.trainable import PROCESS_TAG

    train_s, run_s, setup_s, per_epoch_s, finalize_s, timeline = [], [], [], [], [], []
    rel = lambda ms: ms / 1000 - t_sweep  # noqa: E731  an MLflow timestamp as seconds into the sweep
    for r in runs:
        hist = sorted(c.get_metric_history(r.info.run_id, "seconds_per_epoch"), key=lambda m: m.step)
        train_s.append(sum(m.value for m in hist))
        if not (hist and r.info.end_time and r.info.start_time):
            continue
        # Seconds from the sweep's start: the child run created, its first epoch begun, its last
        # epoch logged, the run ended (epilogue done): where each slot sat idle.
        marks = {"run_start": rel(r.info.start_time), "first_epoch_start": rel(hist[0].timestamp) - hist[0].value,
                 "last_epoch_end": rel(hist[-1].timestamp), "run_end": rel(r.info.end_time)}
        timeline.append({"trial": r.data.tags.get(tracking.TAG_TRIAL, "")[-5:], "rule": r.data.tags.get(tracking.TAG_RULE),
                         "process": r.data.tags.get(PROCESS_TAG, "").split(":")[-1],
                         **{k: round(v, 2) for k, v in marks.items()},
                         **{k: round(v, 2) for k, v in r.data.metrics.items() if k.startswith("setup/")}})
        run_s.append((r.info.end_time - r.info.start_time) / 1000)
        # Where a trial's time goes, from the MLflow timestamps (ms) of its per-epoch metrics:
        # child run created -> epoch 1 logged (less its training) is setup (data, run, params);
        # between epochs, what is not training is per-epoch reporting (MLflow, checkpoint, Tune);
        # last epoch -> run ended is the epilogue (final metrics, model).
        setup_s.append((hist[0].timestamp - r.info.start_time) / 1000 - hist[0].value)
        if len(hist) > 1:
            between = (hist[-1].timestamp - hist[0].timestamp) / 1000 - sum(m.value for m in hist[1:])
            per_epoch_s.append(between / (len(hist) - 1))
        finalize_s.append((r.info.end_time - hist[-1].timestamp) / 1000)
    return {"wall": wall, "ray_init": ray_init_s, "state": result.state, "trial_status": result.trial_status,
            "timing": timing, "n_trials": result.n_trials,
            "n_runs": len(runs), "train_s": sum(train_s), "per_trial_train_s": train_s,
            "mlflow_run_s": run_s, "setup_s": setup_s, "per_epoch_report_s": per_epoch_s,
            "finalize_s": finalize_s, "timeline": sorted(timeline, key=lambda e: e["run_start"])}


def _mean(xs: list[float], digits: int = 2) -> float | None:
    return round(statistics.fmean(xs), digits) if xs else None


def run_sequential(spec) -> dict:
    from tp_engine.data import load_dataset
    from tp_engine.train import train

    t0 = time.perf_counter()
    train_s = []
    for t in spec.expand():
        cfg = spec.trial_config({**t["params"], "seed": t["seed"]})
        ds = load_dataset(cfg.dataset, seed=cfg.seed, subset=cfg.subset, whiten=cfg.whiten, data_path=cfg.data_path)
        res = train(cfg, data=ds)
        train_s.append(sum(h["seconds_per_epoch"] for h in res.history))
    return {"wall": time.perf_counter() - t0, "train_s": sum(train_s), "per_trial_train_s": train_s}


def _commit() -> str | None:
    """The code measured: git HEAD, marked dirty when worker/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "worker"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trial-seconds", type=float, default=3.0,
                   help="training time per trial to aim for (default 3)")
    p.add_argument("--long", action="store_true", help="trials of at least 30 s (--trial-seconds 30 or more)")
    p.add_argument("--dataset", default="xor", help="a synthetic dataset (default xor)")
    p.add_argument("--hidden", default=None,
                   help="hidden layer sizes, comma-separated (default 32,32; with --long 96,96)")
    p.add_argument("--spec", metavar="PATH", help="run this spec's trials instead of the synthetic ones")
    p.add_argument("--no-sequential", action="store_true", help="skip the sequential run (b)")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    args = p.parse_args(argv)
    trial_seconds = max(args.trial_seconds, 30.0) if args.long else args.trial_seconds
    hidden = [int(h) for h in (args.hidden or ("96,96" if args.long else "32,32")).split(",") if h.strip()]

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
        if args.spec:
            from worker.spec import SweepSpec

            spec = SweepSpec.from_yaml(Path(args.spec).read_text())
            base = spec.trial_config(spec.expand()[0]["params"] | {"seed": spec.expand()[0]["seed"]})
            epochs, spe, dataset, hidden = base.epochs, None, base.dataset, list(base.hidden)
            log(f"{spec.n_trials()} trials of {args.spec}")
        else:
            dataset = args.dataset
            epochs, spe = calibrate(args.dataset, hidden, trial_seconds)
            spec = make_spec(args.dataset, hidden, epochs)
            assert spec.n_trials() == N_TRIALS
            log(f"{N_TRIALS} trials of {epochs} epochs on {args.dataset} (about {spe:.3f} s/epoch in-process)")
        import_s = measure_import()
        log(f"trial process imports: {import_s:.2f} s")
        with tempfile.TemporaryDirectory(prefix="bench_sweep_") as d:
            tune = run_tune(spec, Path(d))
        log(f"Tune + MLflow: {tune['wall']:.1f} s ({tune['state']}, {tune['trial_status']})")
        seq = None
        if not (args.no_sequential or args.spec):
            seq = run_sequential(spec)
            log(f"sequential:    {seq['wall']:.1f} s")

    n = tune["n_trials"]
    concurrency = min(CPUS, spec.search.max_concurrent_trials or CPUS)
    cores = concurrency * (spec.resources.cpus_per_trial or 1)
    timing = tune["timing"]
    out = {
        "commit": _commit(),
        "spec": args.spec or "synthetic",
        "n_trials": n,
        "dataset": dataset,
        "hidden": hidden,
        "epochs": epochs,
        "trial_seconds_target": None if args.spec else trial_seconds,
        "cores": cores,
        "run_sweep_wall_s": round(tune["wall"], 2),
        "tune_wall_s": round(timing["wall_s"], 2) if timing.get("wall_s") else None,
        "ray_init_s": round(tune["ray_init"], 2),
        "import_s": round(import_s, 2),
        "epoch_s": round(tune["train_s"], 2),
        "mean_trial_epoch_s": round(tune["train_s"] / n, 2),
        # Efficiency over Tune's wall (the figure the sweep logs and the report shows) and over
        # run_sweep's (parent run, comparison and plots included); the latter is comparable with
        # versions that did not time themselves.
        "efficiency": round(timing["efficiency"], 3) if timing.get("efficiency") else None,
        "efficiency_run_sweep": round(tune["train_s"] / (tune["wall"] * cores), 3),
        "trial_overhead_median_s": (round(timing["trial_overhead_median_s"], 2)
                                    if timing.get("trial_overhead_median_s") is not None else None),
        "trial_overhead_mean_s": round((tune["wall"] * cores - tune["train_s"]) / n, 2),
        # Breakdown of a trial under Tune (means), from the MLflow timestamps: its child run's
        # lifetime split into setup, per-epoch reporting and epilogue (with the model logged in the
        # background, the epilogue runs beside the next trial).
        "mean_mlflow_run_s": _mean(tune["mlflow_run_s"]),
        "mean_trial_setup_s": _mean(tune["setup_s"]),
        "mean_report_per_epoch_s": _mean(tune["per_epoch_report_s"], 3),
        "mean_trial_epilogue_s": _mean(tune["finalize_s"]),
        "goal_efficiency": GOAL_EFFICIENCY,
        "goal_trial_overhead_median_s": GOAL_OVERHEAD_S,
        "sweep_state": tune["state"],
        "child_runs": tune["n_runs"],
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "trial_overhead_s": [round(v, 2) for v in timing.get("trial_overhead_s", [])],
        "timeline": tune["timeline"],
    }
    if seq is not None:
        out.update({
            "sequential_wall_s": round(seq["wall"], 2),
            "epoch_s_sequential": round(seq["train_s"], 2),
            "speedup_vs_sequential": round(seq["wall"] / tune["wall"], 3),
        })
    out["meets_goal_efficiency"] = out["efficiency"] is not None and out["efficiency"] >= GOAL_EFFICIENCY
    out["meets_goal_overhead"] = (out["trial_overhead_median_s"] is not None
                                  and out["trial_overhead_median_s"] <= GOAL_OVERHEAD_S)
    if not args.json:
        width = max(len(k) for k in out)
        for k, v in out.items():
            print(f"{k:<{width}}  {v}")
        print()
    print(json.dumps(out))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if tune["state"] == "succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())

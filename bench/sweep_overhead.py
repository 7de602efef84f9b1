"""What a sweep costs on top of the training it runs.

The same 8 trials (4 rules x 2 seeds on a synthetic set) are run twice:

(a) through ``worker.sweep.run_sweep``: Ray Tune on a local Ray with 2 CPUs, logging to MLflow
    (a SQLite store in a temporary directory);
(b) one after the other in this process with ``tp_engine.train.train``: no Ray, no MLflow.

Measured: the wall time of each; the training time inside the trials (the sum of the per-epoch
``seconds_per_epoch``; for (a) read back from the MLflow metric histories); the import time of a
trial process (once, in a fresh interpreter); and from these

    overhead per trial = (Tune wall x concurrency - in-trial training) / n_trials - import time
    CPU use            = in-trial training / (Tune wall x 2 CPUs)

Starting Ray is a per-sweep cost and is reported apart (``ray_init_s``), not in the Tune wall.

Usage::

    python bench/sweep_overhead.py                    # ~3 s trials (xor)
    python bench/sweep_overhead.py --trial-seconds 10
    python bench/sweep_overhead.py --long             # trials of >= 30 s (a 96-96 net)
    python bench/sweep_overhead.py --json             # only the JSON object on stdout

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
GOAL_OVERHEAD_S = 3.0
GOAL_CPU_USE = 0.8
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
    ray.init(address="local", num_cpus=CPUS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    ray_init_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        result = run_sweep(spec, uri, str(workdir / "tune"), num_cpus=CPUS)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    runs = c.search_runs([exp_id], filter_string=f"tags.`{tracking.TAG_PARENT}` = '{result.parent_run_id}'",
                         max_results=1000)
    train_s, run_s, setup_s, per_epoch_s, finalize_s = [], [], [], [], []
    for r in runs:
        hist = sorted(c.get_metric_history(r.info.run_id, "seconds_per_epoch"), key=lambda m: m.step)
        train_s.append(sum(m.value for m in hist))
        if not (hist and r.info.end_time and r.info.start_time):
            continue
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
            "n_runs": len(runs), "train_s": sum(train_s), "per_trial_train_s": train_s,
            "mlflow_run_s": run_s, "setup_s": setup_s, "per_epoch_report_s": per_epoch_s,
            "finalize_s": finalize_s}


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trial-seconds", type=float, default=3.0,
                   help="training time per trial to aim for (default 3)")
    p.add_argument("--long", action="store_true", help="trials of at least 30 s (--trial-seconds 30 or more)")
    p.add_argument("--dataset", default="xor", help="a synthetic dataset (default xor)")
    p.add_argument("--hidden", default=None,
                   help="hidden layer sizes, comma-separated (default 32,32; with --long 96,96)")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    args = p.parse_args(argv)
    trial_seconds = max(args.trial_seconds, 30.0) if args.long else args.trial_seconds
    hidden = [int(h) for h in (args.hidden or ("96,96" if args.long else "32,32")).split(",") if h.strip()]

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
        epochs, spe = calibrate(args.dataset, hidden, trial_seconds)
        spec = make_spec(args.dataset, hidden, epochs)
        assert spec.n_trials() == N_TRIALS
        log(f"{N_TRIALS} trials of {epochs} epochs on {args.dataset} (about {spe:.3f} s/epoch in-process)")
        import_s = measure_import()
        log(f"trial process imports: {import_s:.2f} s")
        with tempfile.TemporaryDirectory(prefix="bench_sweep_") as d:
            tune = run_tune(spec, Path(d))
        log(f"Tune + MLflow: {tune['wall']:.1f} s ({tune['state']}, {tune['trial_status']})")
        seq = run_sequential(spec)
        log(f"sequential:    {seq['wall']:.1f} s")

    concurrency = min(CPUS, spec.search.max_concurrent_trials or CPUS)
    overhead = (tune["wall"] * concurrency - tune["train_s"]) / N_TRIALS - import_s
    out = {
        "n_trials": N_TRIALS,
        "dataset": args.dataset,
        "hidden": hidden,
        "epochs": epochs,
        "trial_seconds_target": trial_seconds,
        "tune_wall_s": round(tune["wall"], 2),
        "ray_init_s": round(tune["ray_init"], 2),
        "sequential_wall_s": round(seq["wall"], 2),
        "import_s": round(import_s, 2),
        "in_trial_train_s_tune": round(tune["train_s"], 2),
        "in_trial_train_s_sequential": round(seq["train_s"], 2),
        "mean_trial_train_s_tune": round(tune["train_s"] / N_TRIALS, 2),
        # Breakdown of a trial under Tune (means): its MLflow child run's lifetime, split into setup,
        # training, per-epoch reporting and epilogue; and the rest of a trial slot, outside the run
        # (worker process start, imports, Tune scheduling).
        "mean_mlflow_run_s": _mean(tune["mlflow_run_s"]),
        "mean_trial_setup_s": _mean(tune["setup_s"]),
        "mean_report_per_epoch_s": _mean(tune["per_epoch_report_s"], 3),
        "mean_trial_epilogue_s": _mean(tune["finalize_s"]),
        "mean_outside_run_s": round((tune["wall"] * concurrency - sum(tune["mlflow_run_s"])) / N_TRIALS, 2),
        "sequential_overhead_per_trial_s": round(max(0.0, (seq["wall"] - seq["train_s"]) / N_TRIALS), 3),
        "concurrency": concurrency,
        "overhead_per_trial_s": round(max(0.0, overhead), 2),
        "cpu_use": round(tune["train_s"] / (tune["wall"] * CPUS), 3),
        "speedup_vs_sequential": round(seq["wall"] / tune["wall"], 3),
        "goal_overhead_s": GOAL_OVERHEAD_S,
        "goal_cpu_use": GOAL_CPU_USE,
        "sweep_state": tune["state"],
        "child_runs": tune["n_runs"],
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    out["meets_goal_overhead"] = out["overhead_per_trial_s"] <= GOAL_OVERHEAD_S
    out["meets_goal_cpu_use"] = out["cpu_use"] >= GOAL_CPU_USE
    if not args.json:
        width = max(len(k) for k in out)
        for k, v in out.items():
            print(f"{k:<{width}}  {v}")
        print()
    print(json.dumps(out))
    return 0 if tune["state"] == "succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())

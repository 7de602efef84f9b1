"""The TensorFlow path against the NumPy path and Keras, in one run.

For every rule, on Lee's MNIST network (784 -> 7x240 tanh -> 10, batch 100, 500 steps an epoch),
it times an epoch's worth of training steps on both backends, the way ``tp_engine.train`` calls
them: a per_epoch rule's feedback steps then its forward step, a per_batch rule's ``batch_step``
(plus any extra feedback iterations), and the feedback-only passes a rule makes before every
epoch (drl, ddtp_linear). Per repeat, the NumPy and TensorFlow steps of a rule are timed back to
back, so the ratio TF / NumPy is the median of per-repeat ratios (a busy machine slows both
alike). Each repeat also times one Keras ``model.fit`` epoch of the same network (bp's optimizer,
50,000 rows), so ``tf bp / keras fit`` and ``tf dtp / keras fit`` are per-repeat ratios too.

    python bench/tf_path.py [--repeats 5] [--steps 40] [--rules bp,dtp] [--out results/bench/tf_path.json]

It prints one JSON object. ``--no-xla-choice`` compiles every step with XLA, as the backend did
before it learned to keep decompositions (lstp, rlstp) out of XLA, to compare in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tp_engine.backends.numpy_backend import NumpyBackend  # noqa: E402
from tp_engine.config import TrialConfig  # noqa: E402
from tp_engine.engine import Engine  # noqa: E402
from tp_engine.machine import describe  # noqa: E402

LEE = [784] + [240] * 7 + [10]
BATCH, STEPS_PER_EPOCH, KERAS_ROWS = 100, 500, 50_000


def _epoch_fns(rule: str, B, jit: bool):
    """(per-step function, feedback-only step or None, feedback-only steps per training step)."""
    cfg = TrialConfig(rule=rule, hidden=LEE[1:-1], batch_size=BATCH, backend=B.name, jit_compile=jit)
    eng = Engine(B, cfg, LEE[0], LEE[-1], "softmax_ce")
    rng = np.random.default_rng(0)
    x = B.asarray(rng.random((BATCH, LEE[0]), dtype=np.float32))
    y = B.asarray(np.eye(LEE[-1], dtype=np.float32)[rng.integers(0, LEE[-1], BATCH)])
    noise = [B.asarray(np.float32(cfg.noise) * rng.standard_normal((BATCH, eng.noise_width(l)), np.float32))
             for l in eng.trained_feedback_layers]
    if eng.inv_opt is None:
        return (lambda: eng.forward_step(x, y)), None, 0
    if cfg.schedule == "per_batch":
        def step():
            for _ in range(cfg.feedback_iterations - 1):
                eng.inverse_step(x, noise)
            return eng.batch_step(x, y, noise)
    else:
        def step():
            for _ in range(cfg.feedback_iterations):
                eng.inverse_step(x, noise)
            return eng.forward_step(x, y)
    extra = cfg.feedback_iterations * cfg.feedback_epochs_per_epoch
    return step, (lambda: eng.inverse_step(x, noise)), extra


def _sync(out):
    """Wait for TensorFlow's result (steps return tensors; reading one waits for the step)."""
    if isinstance(out, tuple):
        out = out[0]
    np.asarray(out.numpy() if hasattr(out, "numpy") else out)


def _time(f, steps: int) -> float:
    t = time.perf_counter()
    out = None
    for _ in range(steps):
        out = f()
    _sync(out)
    return (time.perf_counter() - t) / steps


def _keras_model():
    import keras

    layers = [keras.Input((LEE[0],))] + [keras.layers.Dense(h, activation="tanh") for h in LEE[1:-1]]
    model = keras.Sequential(layers + [keras.layers.Dense(LEE[-1])])
    # bp's default optimizer (rules/bp.py), Keras's own fused RMSprop.
    model.compile(optimizer=keras.optimizers.RMSprop(0.000804, rho=0.95, momentum=0.9, epsilon=1e-3, centered=True),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((KERAS_ROWS, LEE[0]), dtype=np.float32)
    y = rng.integers(0, LEE[-1], KERAS_ROWS)

    def epoch():
        t = time.perf_counter()
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=True)
        return time.perf_counter() - t

    return epoch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="steps per timed repeat, per rule and backend")
    p.add_argument("--rules", default="", help="comma-separated (default: every registered rule)")
    p.add_argument("--no-keras", action="store_true")
    p.add_argument("--no-xla-choice", action="store_true",
                   help="XLA for every step (the backend's behaviour before decompositions were kept out)")
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args(argv)

    from tp_engine.backends.tf_backend import TensorflowBackend
    from tp_engine.rules import RULES

    rules = args.rules.split(",") if args.rules else list(RULES)
    NP, TF = NumpyBackend(), TensorflowBackend("cpu", jit_compile=True)
    if args.no_xla_choice:
        TF._choose = lambda fn, a: (TF.tf.function(fn, jit_compile=True, reduce_retracing=True), True)
    fns = {}
    for rule in rules:
        for name, B in (("numpy", NP), ("tensorflow", TF)):
            step, fb, extra = _epoch_fns(rule, B, True)
            _sync(step())  # warm-up: numba / tracing / XLA compilation
            if fb is not None and extra:
                _sync(fb())
            fns[rule, name] = (step, fb, extra)
    keras_epoch = None if args.no_keras else _keras_model()
    if keras_epoch is not None:
        keras_epoch()  # warm-up: tracing and compilation

    per = {k: [] for k in fns}  # seconds per epoch, per repeat
    keras = []
    for _ in range(args.repeats):
        for rule in rules:
            for name in ("numpy", "tensorflow"):
                step, fb, extra = fns[rule, name]
                s = _time(step, args.steps) * STEPS_PER_EPOCH
                if fb is not None and extra:
                    s += _time(fb, args.steps) * extra * STEPS_PER_EPOCH
                per[rule, name].append(s)
        if keras_epoch is not None:
            keras.append(keras_epoch())

    med = statistics.median
    out = {"machine": describe(), "tensorflow": TF.tf.__version__, "network": LEE, "batch": BATCH,
           "steps_per_epoch": STEPS_PER_EPOCH, "repeats": args.repeats, "steps_per_repeat": args.steps,
           "xla_choice": not args.no_xla_choice, "rules": {}}
    for rule in rules:
        n, t = per[rule, "numpy"], per[rule, "tensorflow"]
        r = {"numpy_seconds_per_epoch": med(n), "tensorflow_seconds_per_epoch": med(t),
             "tf_to_numpy": med(b / a for a, b in zip(n, t))}
        if keras:
            r["tf_to_keras_fit"] = med(b / k for b, k in zip(t, keras))
            r["numpy_to_keras_fit"] = med(a / k for a, k in zip(n, keras))
        out["rules"][rule] = r
    if keras:
        out["keras_fit_bp_seconds_per_epoch"] = med(keras)
    goals = {"tf_to_numpy_max": 1.0, "tf_bp_to_keras_fit_max": 1.0, "tf_dtp_to_keras_fit_max": 1.5}
    met = {"every_rule_tf_not_slower": all(r["tf_to_numpy"] <= 1.0 for r in out["rules"].values())}
    if keras and "bp" in out["rules"]:
        met["bp"] = out["rules"]["bp"]["tf_to_keras_fit"] <= 1.0
    if keras and "dtp" in out["rules"]:
        met["dtp"] = out["rules"]["dtp"]["tf_to_keras_fit"] <= 1.5
    out["goals"], out["met"] = goals, met
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

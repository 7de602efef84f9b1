"""One training run: the loop, and the ``python -m tp_engine.train`` CLI.

``train(cfg, on_epoch=...)`` calls ``on_epoch(metrics, checkpoint)`` after every epoch with a flat
dict of numbers and the state to resume from, so the worker can report each epoch to Ray Tune and MLflow. A non-finite loss or weight,
or a training loss past ``divergence_factor`` times the first epoch's, ends the run with status
``diverged``; the last finite metrics are kept.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from tp_engine.config import TrialConfig
from tp_engine.losses import LOSSES
from tp_engine.model import TrainedModel
from tp_engine.status import TrialStatus


def resolve_loss(cfg: TrialConfig) -> str:
    if cfg.loss is not None:
        return cfg.loss
    if cfg.mode == "classification":
        return "softmax_ce"
    from tp_engine.data import SOURCES

    # Pixels in [0, 1] suit a sigmoid output; the synthetic sets are standardized reals.
    return "sigmoid_ce" if SOURCES[cfg.dataset].image_shape is not None else "l2"


@dataclass
class TrainResult:
    status: TrialStatus  # completed or diverged
    config: TrialConfig
    history: list[dict[str, float]]
    summary: dict[str, Any]
    model: TrainedModel
    checkpoint: dict[str, np.ndarray] = field(default_factory=dict)


def _targets(cfg: TrialConfig, x: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    if cfg.mode == "autoencoder":
        return x
    return np.eye(n_classes, dtype=np.float32)[y]


def evaluate(engine, x: np.ndarray, y: np.ndarray, mode: str, loss: str, chunk: int = 5000) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over a whole split."""
    from tp_engine.backends.numpy_backend import NumpyBackend

    NP = NumpyBackend()
    B = engine.B
    tot_loss, correct = 0.0, 0
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        z = np.asarray(B.to_numpy(engine.predict_logits(B.asarray(xb))))
        yb = y[i : i + chunk]
        tot_loss += float(np.sum(LOSSES[loss].value(NP, z, yb)))
        if mode == "classification":
            correct += int(np.sum(np.argmax(z, 1) == np.argmax(yb, 1)))
    out = {"loss": tot_loss / len(x)}
    if mode == "classification":
        out["accuracy"] = correct / len(x)
    return out


def _finite(engine) -> bool:
    return all(np.isfinite(v).all() for v in engine.net.state().values())


def train(
    cfg: TrialConfig,
    on_epoch: Callable[[dict[str, float], dict[str, np.ndarray]], None] | None = None,
    *,
    data=None,
    resume: dict[str, np.ndarray] | None = None,
    start_epoch: int = 0,
    history: list[dict[str, float]] | None = None,
    progress: Callable[[int, int], None] | None = None,
    cache_dir: str | None = None,
) -> TrainResult:
    """Train one model. ``resume`` (from ``TrainResult.checkpoint``) continues at ``start_epoch``.
    Without ``data``, the dataset is loaded with downloads cached in ``cache_dir`` (default
    ``tp_engine.data.DEFAULT_CACHE_DIR``)."""
    from tp_engine.backends import get_backend
    from tp_engine.data import load_dataset
    from tp_engine.engine import Engine, engine_state, load_engine_state

    ds = data if data is not None else load_dataset(
        cfg.dataset, seed=cfg.seed, subset=cfg.subset, whiten=cfg.whiten, data_path=cfg.data_path,
        cache_dir=cache_dir,
    )
    loss = resolve_loss(cfg)
    x_tr, x_va, x_te = ds.x_train, ds.x_valid, ds.x_test
    y_tr = _targets(cfg, x_tr, ds.y_train, ds.n_classes)
    y_va = _targets(cfg, x_va, ds.y_valid, ds.n_classes)
    y_te = _targets(cfg, x_te, ds.y_test, ds.n_classes)
    B = get_backend(cfg.backend, cfg.device, cfg.jit_compile)
    engine = Engine(B, cfg, x_tr.shape[1], y_tr.shape[1], loss)
    if resume:
        load_engine_state(engine, resume)
    net = engine.net
    n, bs = len(x_tr), cfg.batch_size
    n_batches = max(1, n // bs)  # the last partial batch is dropped, as in the seed
    diag_x, diag_y = B.asarray(x_tr[: cfg.diag_size]), B.asarray(y_tr[: cfg.diag_size])
    noise_shapes = [(bs, engine.noise_width(l)) for l in engine.trained_feedback_layers]
    diag_noise_rng = np.random.default_rng(engine.noise_seq.spawn(1)[0])
    diag_noise = [B.asarray(cfg.noise * diag_noise_rng.standard_normal((len(x_tr[: cfg.diag_size]), s[1]), np.float32)) for s in noise_shapes]

    history = list(history or [])
    status = TrialStatus.COMPLETED
    checkpoint = engine_state(engine)  # also the last finite state, restored on divergence
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        # Per-epoch streams derived from the seed, so a resumed run draws what it would have.
        rng = np.random.default_rng([cfg.seed, epoch, 1])
        noise_rng = np.random.default_rng([cfg.seed, epoch, 2])
        perm = rng.permutation(n)
        batches = [perm[i * bs : (i + 1) * bs] for i in range(n_batches)]

        def noise_for(step: int, rng=noise_rng):
            sigma = cfg.noise / (1.0 + step / 100.0) if cfg.noise_decay else cfg.noise
            out = []
            for s in noise_shapes:
                e = rng.standard_normal(s, np.float32)
                e *= sigma  # in place: the same float32 products as sigma * e, one array fewer
                out.append(B.asarray(e))
            return out

        def feedback_on(xb, step: int, rng=noise_rng):
            for _ in range(cfg.feedback_iterations):  # fresh noise for every iteration
                engine.inverse_step(xb, noise_for(step, rng))

        loss_sum, correct, bad = 0.0, 0, False
        with np.errstate(all="ignore"):
            if engine.inv_opt is not None:
                # Feedback-only passes (drl, ddtp_linear: the authors' pre-training, then one more
                # before each epoch), each on its own noise stream so resuming draws the same.
                passes = cfg.feedback_pretrain_epochs if epoch == 0 else cfg.feedback_epochs_per_epoch
                for k in range(passes):
                    fb_rng = np.random.default_rng([cfg.seed, epoch, 3, k])
                    for i in fb_rng.permutation(n)[: n_batches * bs].reshape(n_batches, bs):
                        feedback_on(B.asarray(x_tr[i]), epoch * n_batches, fb_rng)
                if cfg.schedule == "per_epoch":
                    for i, idx in enumerate(batches):
                        feedback_on(B.asarray(x_tr[idx]), epoch * n_batches + i)
            outs = []
            for i, idx in enumerate(batches):
                xb, yb = B.asarray(x_tr[idx]), B.asarray(y_tr[idx])
                if engine.inv_opt is not None and cfg.schedule == "per_batch":
                    for _ in range(cfg.feedback_iterations - 1):
                        engine.inverse_step(xb, noise_for(epoch * n_batches + i))
                    out = engine.batch_step(xb, yb, noise_for(epoch * n_batches + i))
                else:
                    out = engine.forward_step(xb, yb)
                outs.append(out)
                if progress is not None:
                    progress(i + 1, n_batches)
                # Checking each step costs a host sync on TensorFlow; every 50 steps is enough.
                if i % 50 == 49 or i == n_batches - 1:
                    part = sum(float(B.to_numpy(o[0])) for o in outs)
                    correct += sum(int(B.to_numpy(o[1])) for o in outs)
                    loss_sum += part
                    outs = []
                    if not math.isfinite(part):
                        bad = True
                        break
            if not bad and not _finite(engine):
                bad = True
            if not bad:
                va = evaluate(engine, x_va, y_va, cfg.mode, loss)
                te = evaluate(engine, x_te, y_te, cfg.mode, loss)
                d = {k: float(np.asarray(B.to_numpy(v))) for k, v in engine.diagnose(diag_x, diag_y, diag_noise).items()}
                bad = not all(math.isfinite(v) for k, v in va.items())
            seen = (i + 1) * bs
            if not bad and history and cfg.divergence_factor is not None:
                # Finite but exploding: compared with the first epoch's training loss.
                bad = loss_sum / seen > cfg.divergence_factor * max(history[0]["train_loss"], 1e-12)
        if bad:
            status = TrialStatus.DIVERGED
            break
        m: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "valid_loss": va["loss"],
            "test_loss": te["loss"],
            "seconds_per_epoch": time.perf_counter() - t0,
        }
        if cfg.mode == "classification":
            m["train_accuracy"] = correct / seen
            m["valid_accuracy"] = va["accuracy"]
            m["test_accuracy"] = te["accuracy"]
        for l in range(1, net.L + 1):
            cos = d[f"dot/{l}"] / max(d[f"norm_rule/{l}"] * d[f"norm_bp/{l}"], 1e-30)
            m[f"angle_bp/{l}"] = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
            m[f"local_loss/{l}"] = d[f"local_loss/{l}"]
        for l in engine.trained_feedback_layers:
            m[f"inverse_loss/{l}"] = d[f"inverse_loss/{l}"]
        history.append(m)
        checkpoint = engine_state(engine)
        if on_epoch is not None:
            on_epoch(dict(m), checkpoint)

    if status == TrialStatus.DIVERGED:
        load_engine_state(engine, checkpoint)  # keep the last finite weights
    summary = summarize(cfg, status, history)
    model = TrainedModel(cfg, engine.net.state(), loss, cfg.mode)
    return TrainResult(status, cfg, history, summary, model, checkpoint)


def summarize(cfg: TrialConfig, status: str, history: list[dict[str, float]]) -> dict[str, Any]:
    """The run's final numbers. Test metrics are reported at the last epoch and at the epoch of
    best validation accuracy (selection uses validation only)."""
    last = history[-1] if history else {}
    out: dict[str, Any] = {
        "rule": cfg.rule,
        "backend": cfg.backend,
        "dataset": cfg.dataset,
        "mode": cfg.mode,
        "seed": cfg.seed,
        "epochs": len(history),
        "status": status,
        "train_loss": last.get("train_loss"),
        "valid_loss": last.get("valid_loss"),
        "test_loss": last.get("test_loss"),
        "valid_accuracy": last.get("valid_accuracy"),
        "test_accuracy": last.get("test_accuracy"),
        "seconds_per_epoch": (
            float(np.median([h["seconds_per_epoch"] for h in history])) if history else None
        ),
        "angle_bp": {k.split("/")[1]: v for k, v in last.items() if k.startswith("angle_bp/")},
    }
    if history and cfg.mode == "classification":
        best = max(history, key=lambda h: h["valid_accuracy"])
        out["best_epoch"] = int(best["epoch"])
        out["best_valid_accuracy"] = best["valid_accuracy"]
        out["test_accuracy_at_best_valid"] = best["test_accuracy"]
    return out


# -- CLI ------------------------------------------------------------------------------------
class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    from tp_engine.config import set_path

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        set_path(out, key.strip(), value)
    return out


def format_validation_error(err) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    p = _ArgParser(prog="python -m tp_engine.train", description="Train one model with a propagation rule.")
    from tp_engine.data import DEFAULT_CACHE_DIR
    from tp_engine.rules import RULES

    p.add_argument("--rule", required=True, choices=list(RULES))
    p.add_argument("--backend", default="numpy", choices=["numpy", "tensorflow"])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, dotted")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, metavar="DIR",
                   help=f"where downloaded datasets are kept (default {DEFAULT_CACHE_DIR})")
    p.add_argument("--save", metavar="DIR", help="save the trained model here")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout at the end")
    args = p.parse_args(argv)
    try:
        data = parse_set(args.set)
        data.update(rule=args.rule, backend=args.backend, dataset=args.dataset, epochs=args.epochs, seed=args.seed)
        cfg = TrialConfig(**data)
    except ValidationError as e:
        print(f"error: {format_validation_error(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tp_engine.data import DataError

    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as bar:
        task = bar.add_task(f"{cfg.rule} epoch 1/{cfg.epochs}", total=None)
        state = {"epoch": 0}

        def on_progress(i, total):
            if i == 1 or i % 10 == 0 or i == total:
                bar.update(task, completed=i, total=total, description=f"{cfg.rule} epoch {state['epoch'] + 1}/{cfg.epochs}")

        def on_epoch(m, checkpoint=None):
            state["epoch"] = int(m["epoch"])
            acc = f" valid_acc {m['valid_accuracy']:.4f}" if "valid_accuracy" in m else ""
            angles = [v for k, v in m.items() if k.startswith("angle_bp/")]
            console.print(
                f"\\[{cfg.rule}/{cfg.backend}] epoch {int(m['epoch'])}/{cfg.epochs} "
                f"train_loss {m['train_loss']:.4f} valid_loss {m['valid_loss']:.4f}{acc} "
                f"angle_bp(mean) {np.mean(angles):.1f}° {m['seconds_per_epoch']:.1f}s"
            )

        try:
            res = train(cfg, on_epoch, progress=on_progress, cache_dir=args.cache_dir)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if res.status == TrialStatus.DIVERGED:
        console.print(f"[yellow]diverged after {len(res.history)} finite epoch(s)[/yellow]")
    if args.save:
        res.model.save(args.save)
    if args.json:
        print(json.dumps(res.summary))
    else:
        console.print(json.dumps(res.summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

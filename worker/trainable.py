"""One Ray Tune trial: build the trial config from the spec, train with the engine, report every
epoch to Tune (with a checkpoint) and to the trial's own MLflow child run."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# A test hook: when set to a path, the trial raises once at epoch 2 (creating the path), so the
# retry-from-checkpoint path can be exercised on a real cluster.
FAIL_ONCE_ENV = "TP_FAIL_ONCE_MARKER"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares; passed with tune.with_parameters."""

    spec: dict[str, Any]
    sweep_id: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


STATE_FILE, META_FILE = "state.npz", "meta.json"


def _load_checkpoint():
    """(meta, state) to resume from, or (None, None) for a fresh start."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None, None
    got = _read_checkpoint(ckpt)
    if got is None:
        # Pruned (see prune_checkpoints) or cut short while being overwritten: the experiment
        # state Tune resumed from names a checkpoint that has since been superseded. The trial's
        # newest whole one is a state of the same deterministic run, further along.
        got = _newest_whole_checkpoint(ckpt)
    if got is None:
        raise RuntimeError(f"no readable checkpoint at or beside {ckpt.path}")
    return got


def _read_checkpoint(ckpt) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(meta, state), or None when the checkpoint holds no whole state."""
    import zipfile

    with ckpt.as_directory() as d:
        path = Path(d) / STATE_FILE
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                state = {k: z[k] for k in z.files if k != "__meta__"}
                # Older checkpoints keep their meta only in meta.json.
                raw = str(z["__meta__"]) if "__meta__" in z.files else (Path(d) / META_FILE).read_text()
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None
    return json.loads(raw), state


def _checkpoint_dirs(ckpt) -> list[tuple[int, str]]:
    """(index, path) of every checkpoint directory of ckpt's trial, ckpt's own included."""
    import posixpath

    import pyarrow.fs as pafs

    out = []
    parent = posixpath.dirname(ckpt.path.rstrip("/"))
    for info in ckpt.filesystem.get_file_info(pafs.FileSelector(parent)):
        name = info.base_name
        if info.type == pafs.FileType.Directory and name.startswith("checkpoint_") and name[11:].isdigit():
            out.append((int(name[11:]), info.path))
    return out


def _newest_whole_checkpoint(ckpt) -> tuple[dict, dict[str, np.ndarray]] | None:
    from ray import tune

    best = None
    for _, path in _checkpoint_dirs(ckpt):
        got = _read_checkpoint(tune.Checkpoint(path, filesystem=ckpt.filesystem))
        if got is not None and (best is None or got[0]["epoch"] > best[0]["epoch"]):
            best = got
    return best


def _save_checkpoint(d: Path, meta: dict, state: dict[str, np.ndarray]) -> None:
    # The meta also goes inside state.npz, so a checkpoint torn while a resumed trial overwrites
    # it in place fails to load instead of pairing one epoch's meta with another's state;
    # meta.json alone stays behind when the state is pruned, keeping the directory.
    np.savez(d / STATE_FILE, **state, __meta__=np.array(json.dumps(meta)))
    (d / META_FILE).write_text(json.dumps(meta))


def prune_checkpoints(ckpt) -> None:
    """Drop the state of the trial's checkpoints older than ``ckpt``, a checkpoint Tune has just
    registered, but keep their directories: the experiment state Tune resumes from may still
    name one (it is snapshotted only now and then), and Tune refuses to restore a trial whose
    named checkpoint is gone, while _load_checkpoint moves on from a pruned one to the newest.
    Only older indices: a newer one may be being written right now. Never raises (Tune would
    skip registering the checkpoint)."""
    import logging
    import posixpath

    try:
        index = int(posixpath.basename(ckpt.path.rstrip("/"))[11:])
        for i, path in _checkpoint_dirs(ckpt):
            if i < index:
                try:
                    ckpt.filesystem.delete_file(posixpath.join(path, STATE_FILE))
                except OSError:
                    pass  # already pruned
    except Exception:  # noqa: BLE001
        logging.getLogger(__name__).warning("could not prune checkpoints before %s", ckpt.path, exc_info=True)


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    from ray import tune

    from tp_engine.data import load_dataset
    from tp_engine.status import SETTLED, TrialStatus
    from tp_engine.train import train
    from worker import tracking
    from worker.spec import SweepSpec

    spec = SweepSpec.model_validate(ctx.spec)
    cfg = spec.trial_config(dict(params))
    trial_id = tune.get_context().get_trial_id()
    c = tracking.client(ctx.tracking_uri)
    tags = {tracking.TAG_RULE: cfg.rule, tracking.TAG_BACKEND: cfg.backend, tracking.TAG_SEED: str(cfg.seed),
            tracking.TAG_CONFIG_HASH: cfg.config_hash(), tracking.TAG_DATASET: cfg.dataset,
            **tracking.machine_tags()}
    name = f"{cfg.rule}-s{cfg.seed}-{trial_id[-5:]}"
    prior = tracking.find_run(c, ctx.experiment_id, **{tracking.TAG_SWEEP: ctx.sweep_id, tracking.TAG_TRIAL: trial_id})
    settled = prior.data.tags.get(tracking.TAG_STATUS) if prior is not None else None
    if settled in SETTLED:
        # Finished and logged before the sweep driver died, but the Tune snapshot being resumed
        # predates its last report: do not train, log or reopen it again, only tell Tune.
        if prior.info.status != "FINISHED":
            c.set_terminated(prior.info.run_id, "FINISHED")
        last = {k: v for k, v in prior.data.metrics.items() if not k.startswith("final/")}
        tune.report({**last, "epoch": prior.data.metrics.get("final/epochs", 0), "status": settled, "rule": cfg.rule})
        return
    run_id, created = tracking.child_run(c, ctx.experiment_id, ctx.parent_run_id, ctx.sweep_id, trial_id,
                                         tags, cfg.flat(), name)
    # Epochs a killed attempt logged after its last checkpoint are rerun (with the same result: the
    # per-epoch random streams come from the seed) but not logged twice.
    logged = set() if created else {m.step for m in c.get_metric_history(run_id, "seconds_per_epoch")}

    meta, state = _load_checkpoint()
    start_epoch = int(meta["epoch"]) if meta else 0
    history = meta["history"] if meta else []

    from worker.paths import cache_dir

    ds = load_dataset(cfg.dataset, seed=cfg.seed, subset=cfg.subset, whiten=cfg.whiten, data_path=cfg.data_path,
                      cache_dir=str(cache_dir()))

    def on_epoch(m: dict[str, float], st: dict[str, np.ndarray]) -> None:
        epoch = int(m["epoch"])
        marker = os.environ.get(FAIL_ONCE_ENV)
        if marker and epoch == 2 and not os.path.exists(marker):
            Path(marker).write_text(trial_id)
            raise RuntimeError("injected failure (TP_FAIL_ONCE_MARKER)")
        if epoch not in logged:
            tracking.log_metrics(c, run_id, {k: v for k, v in m.items() if k != "epoch"}, step=epoch)
        history.append(m)
        if epoch >= cfg.epochs:
            # Reported once the run is finalized: a scheduler may stop the trial at any report,
            # and ASHA always does at max_t (the last epoch).
            last_epoch["m"], last_epoch["st"] = m, st
            return
        report(m, TrialStatus.RUNNING, st, epoch)

    def report(m: dict[str, float], status: str, st: dict[str, np.ndarray] | None = None, epoch: int = 0) -> None:
        if st is None:
            tune.report({**m, "status": status, "rule": cfg.rule})
            return
        with tempfile.TemporaryDirectory() as d:
            _save_checkpoint(Path(d), {"epoch": epoch, "history": history, "run_id": run_id}, st)
            tune.report({**m, "status": status, "rule": cfg.rule}, checkpoint=tune.Checkpoint.from_directory(d))

    last_epoch: dict[str, Any] = {}
    res = train(cfg, on_epoch, data=ds, resume=state, start_epoch=start_epoch, history=list(history))
    s = res.summary
    final = {f"final/{k}": v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracking.log_metrics(c, run_id, final, step=len(res.history))
    # A resumed attempt keeps a model an attempt killed during this epilogue already logged (the
    # same weights: the rerun epochs are deterministic) instead of logging a second one.
    _log_artifacts(c, run_id, res, ds, cfg, with_model=created or not _has_model(ctx.experiment_id, run_id))
    c.set_terminated(run_id, "FINISHED")
    c.set_tag(run_id, tracking.TAG_STATUS, res.status)
    # The trial's last act: after this report Tune may stop it.
    if last_epoch:
        report(last_epoch["m"], res.status, last_epoch["st"], int(last_epoch["m"]["epoch"]))
    else:  # diverged, or resumed from the checkpoint of its last epoch
        report(res.history[-1] if res.history else {}, res.status)


def _has_model(experiment_id: str, run_id: str) -> bool:
    import mlflow

    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    return any(m.name == "model" and getattr(m.status, "name", str(m.status)) == "READY" for m in models)


def _log_artifacts(c, run_id: str, res, ds, cfg, with_model: bool = True) -> None:
    """The model (an MLflow pyfunc) and, for autoencoders, a PNG of inputs beside reconstructions."""
    import mlflow

    from worker.mlflow_model import log_model

    with tempfile.TemporaryDirectory() as d, mlflow.start_run(run_id=run_id):
        if with_model:
            log_model(res.model, Path(d), ds.x_test[:5])
        mlflow.log_dict(res.summary, "summary.json")
        if cfg.mode == "autoencoder" and ds.image_shape is not None:
            mlflow.log_figure(reconstruction_grid(res.model, ds), "reconstructions.png")


def reconstruction_grid(model, ds, n: int = 8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = ds.x_test[:n]
    rec = model.predict(x)
    imgs, recs = ds.images(x), ds.images(rec)
    fig, axes = plt.subplots(2, n, figsize=(n * 1.2, 2.6))
    for i in range(n):
        for row, arr in ((0, imgs), (1, recs)):
            ax = axes[row, i]
            ax.imshow(np.clip(arr[i], 0, 1), cmap="gray" if arr[i].ndim == 2 else None)
            ax.axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    fig.tight_layout()
    return fig

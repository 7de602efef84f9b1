"""One Ray Tune trial: build the trial config from the spec, train with the engine, report every
epoch to Tune (with a checkpoint) and to the trial's own MLflow child run."""
from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Trial hooks: "module:callable[,module:callable...]", each called in the trial's process with a
# HookEvent at every hook point (see run_trial). An extension point, e.g. for the tests' fault
# injection (tests/faults.py); a hook that raises fails what it was called for.
TRIAL_HOOKS_ENV = "TP_TRIAL_HOOKS"
EPOCH_END, BEFORE_EPILOGUE = "epoch_end", "before_epilogue"


@dataclass(frozen=True)
class HookEvent:
    """What a trial hook is told. point: EPOCH_END (an epoch is trained, its metrics not yet
    logged or reported) or BEFORE_EPILOGUE (the model and artifacts of a finished trial are about
    to be logged; deferred: behind its last report, in the process's background thread)."""

    point: str
    trial_id: str
    run_id: str
    epoch: int
    metrics: dict[str, float]
    deferred: bool = False


_HOOKS: dict[str, tuple[Callable[[HookEvent], None], ...]] = {}


def trial_hooks() -> tuple[Callable[[HookEvent], None], ...]:
    """The hooks TRIAL_HOOKS_ENV names, imported once per process. Raises RuntimeError naming the
    variable when one cannot be loaded (the trial then fails instead of running without it)."""
    import importlib

    spec = os.environ.get(TRIAL_HOOKS_ENV, "").strip()
    if spec not in _HOOKS:
        hooks = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            module, _, attr = item.partition(":")
            try:
                if not module or not attr:
                    raise ValueError("expected module:callable")
                fn = getattr(importlib.import_module(module), attr)
                if not callable(fn):
                    raise TypeError(f"{attr} is not callable")
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"{TRIAL_HOOKS_ENV}: cannot load the hook {item!r}: "
                                   f"{type(e).__name__}: {e}") from e
            hooks.append(fn)
        _HOOKS[spec] = tuple(hooks)
    return _HOOKS[spec]


def _call_hooks(hooks, event: HookEvent) -> None:
    for fn in hooks:
        fn(event)


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

    from tp_engine.status import SETTLED, TrialStatus
    from tp_engine.train import train
    from worker import tracking
    from worker.search_space import trial_params
    from worker.spec import SweepSpec

    t_entry = time.perf_counter()
    hooks = trial_hooks()
    spec = SweepSpec.model_validate(ctx.spec)
    cfg = spec.trial_config(trial_params(params))
    trial_id = tune.get_context().get_trial_id()
    c = tracking.client(ctx.tracking_uri)
    tags = {tracking.TAG_RULE: cfg.rule, tracking.TAG_BACKEND: cfg.backend, tracking.TAG_SEED: str(cfg.seed),
            tracking.TAG_CONFIG_HASH: cfg.config_hash(), tracking.TAG_DATASET: cfg.dataset,
            **tracking.machine_tags(), PROCESS_TAG: process_name()}
    name = f"{cfg.rule}-s{cfg.seed}-{trial_id[-5:]}"
    prior = tracking.find_run(c, ctx.experiment_id, **{tracking.TAG_SWEEP: ctx.sweep_id, tracking.TAG_TRIAL: trial_id})
    settled = prior.data.tags.get(tracking.TAG_STATUS) if prior is not None else None
    if settled in SETTLED:
        # Finished and logged before the sweep driver died, but the Tune snapshot being resumed
        # predates its last report: do not train, log or reopen it again, only tell Tune.
        if prior.info.status != "FINISHED":
            c.set_terminated(prior.info.run_id, "FINISHED")
        last = {k: v for k, v in prior.data.metrics.items() if not k.startswith("final/")}
        tune.report({**last, "epoch": prior.data.metrics.get("final/epochs", 0), "status": settled, "rule": cfg.rule,
                     TRAINED_KEY: 0.0})
        return
    run_id, created = tracking.child_run(c, ctx.experiment_id, ctx.parent_run_id, ctx.sweep_id, trial_id,
                                         tags, cfg.flat(), name)
    # Epochs a killed attempt logged after its last checkpoint are rerun (with the same result: the
    # per-epoch random streams come from the seed) but not logged twice.
    logged = set() if created else {m.step for m in c.get_metric_history(run_id, "seconds_per_epoch")}

    meta, state = _load_checkpoint()
    start_epoch = int(meta["epoch"]) if meta else 0
    history = meta["history"] if meta else []

    t_run = time.perf_counter()
    ds = trial_dataset(cfg)
    if created:  # the run's Dataset column in the MLflow UI: the data's name and digest
        tracking.with_retry(c, "the trial's dataset input",
                            lambda: tracking.log_dataset(c, run_id, cfg.dataset, ds.x_train, ds.y_train))
    EPILOGUES.warm()
    t_data = time.perf_counter()
    # Where a trial's time outside its epochs goes (the sweep's per-trial overhead, issue 12),
    # logged once per attempt at its first epoch: the config, MLflow run and checkpoint lookup,
    # the data, and the engine's set-up before the first epoch started.
    setup: dict[str, float] = {}

    def on_epoch(m: dict[str, float], st: dict[str, np.ndarray]) -> None:
        epoch = int(m["epoch"])
        _call_hooks(hooks, HookEvent(EPOCH_END, trial_id, run_id, epoch, dict(m)))
        first = not setup
        if first:
            first_epoch_start = time.perf_counter() - m["seconds_per_epoch"]
            setup.update({"setup/mlflow_s": t_run - t_entry, "setup/data_s": t_data - t_run,
                          "setup/engine_s": max(0.0, first_epoch_start - t_data)})
        if epoch not in logged:
            metrics = {k: v for k, v in m.items() if k != "epoch"}
            tracking.log_metrics(c, run_id, {**setup, **metrics} if first else metrics, step=epoch)
        history.append(m)
        if epoch >= cfg.epochs:
            # Reported once the run is finalized: a scheduler may stop the trial at any report,
            # and ASHA always does at max_t (the last epoch).
            last_epoch["m"], last_epoch["st"] = m, st
            return
        report(m, TrialStatus.RUNNING, st, epoch, m["seconds_per_epoch"])

    def report(m: dict[str, float], status: str, st: dict[str, np.ndarray] | None = None, epoch: int = 0,
               trained_s: float = 0.0) -> None:
        # TRAINED_KEY: the epoch seconds trained in this process since the last report (the
        # driver's per-trial overhead is a trial's time less these).
        out = {**m, "status": status, "rule": cfg.rule, TRAINED_KEY: trained_s}
        if st is None:
            tune.report(out)
            return
        with tempfile.TemporaryDirectory() as d:
            _save_checkpoint(Path(d), {"epoch": epoch, "history": history, "run_id": run_id}, st)
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))

    last_epoch: dict[str, Any] = {}
    res = train(cfg, on_epoch, data=ds, resume=state, start_epoch=start_epoch, history=list(history))
    if last_epoch:
        # The usual end: the epoch's checkpoint goes with the last report, so the model can always
        # be rebuilt from it. The model and the rest of the run's epilogue are logged behind the
        # next trial of this process (the trial's run is settled, status tag last, only once they
        # are in; a process that dies first leaves that to the driver: see finish_from_checkpoint).
        event = HookEvent(BEFORE_EPILOGUE, trial_id, run_id, len(res.history), dict(last_epoch["m"]), deferred=True)
        EPILOGUES.submit(_background_epilogue, hooks, event, c, ctx.experiment_id, run_id, res, _slim(ds), cfg,
                         created)
        report(last_epoch["m"], res.status, last_epoch["st"], int(last_epoch["m"]["epoch"]),
               last_epoch["m"]["seconds_per_epoch"])
    else:
        # Diverged, or resumed from the checkpoint of its last epoch: no checkpoint goes with the
        # last report, so the run is settled before it.
        _call_hooks(hooks, HookEvent(BEFORE_EPILOGUE, trial_id, run_id, len(res.history),
                                     dict(res.history[-1]) if res.history else {}))
        _epilogue(c, ctx.experiment_id, run_id, res, ds, cfg, created)
        report(res.history[-1] if res.history else {}, res.status)


def _epilogue(c, experiment_id: str, run_id: str, res, ds, cfg, created: bool) -> None:
    """Settle a trial's run: final metrics, the model and summary, then FINISHED and the status
    tag, last (a run tagged settled has its model)."""
    from worker import tracking

    s = res.summary
    final = {f"final/{k}": v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracking.log_metrics(c, run_id, final, step=len(res.history))
    # A resumed attempt keeps a model an attempt killed during this epilogue already logged (the
    # same weights: the rerun epochs are deterministic) instead of logging a second one; one it
    # left half-logged (PENDING) is dropped. During an MLflow outage this waits for the server and
    # is made again (tracking.with_retry); a try the outage cut off mid-model is dropped the same way.
    tries = []

    def artifacts() -> None:
        with_model = (created and not tries) or not _has_model(experiment_id, run_id)
        if with_model and (tries or not created):
            tracking.discard_pending_models(c, experiment_id, run_id)
        tries.append(1)
        _log_artifacts(c, run_id, res, ds, cfg, with_model=with_model)

    tracking.with_retry(c, "the trial's model and artifacts", artifacts)
    c.set_terminated(run_id, "FINISHED")
    c.set_tag(run_id, tracking.TAG_STATUS, res.status)


def _background_epilogue(hooks, event: HookEvent, *args) -> None:
    _call_hooks(hooks, event)
    _epilogue(*args)


def finish_from_checkpoint(c, ctx: TrialContext, params: dict[str, Any], run_id: str, checkpoint) -> bool:
    """Settle the run of a trial Tune saw finish but whose process died before its epilogue was
    logged (see run_trial): the model is rebuilt from the trial's last checkpoint (that of its
    last epoch: no epoch is trained again) and logged with the rest. False if there is no
    checkpoint to rebuild it from."""
    from tp_engine.train import train
    from worker.search_space import trial_params
    from worker.spec import SweepSpec

    if checkpoint is None:
        return False
    got = _read_checkpoint(checkpoint) or _newest_whole_checkpoint(checkpoint)
    if got is None:
        return False
    meta, state = got
    cfg = SweepSpec.model_validate(ctx.spec).trial_config(trial_params(params))
    ds = trial_dataset(cfg)
    res = train(cfg, data=ds, resume=state, start_epoch=int(meta["epoch"]), history=list(meta["history"]))
    _epilogue(c, ctx.experiment_id, run_id, res, ds, cfg, created=False)
    return True


# ---- what a trial process keeps between the trials it runs (Tune's reuse_actors) ---------------
#
# Only what cannot change a result: datasets as loaded (read-only: trial_dataset), and the
# epilogues still being logged for trials already reported. Everything a trial trains with is
# made afresh in run_trial.

TRAINED_KEY = "trained_s"
PROCESS_TAG = "tp.process"  # host:pid of the trial's process (several trials share one)
_DATASETS: OrderedDict[tuple, Any] = OrderedDict()
_DATASETS_KEPT = 3  # e.g. one per seed of a sweep; MNIST at 20k rows is about 125 MB each
DATA_ARRAYS = ("x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test")  # made read-only


def process_name() -> str:
    import platform

    return f"{platform.node()}:{os.getpid()}"


def trial_dataset(cfg):
    """``load_dataset`` for the trial's config, loaded once per process and handed to each trial
    read-only: a trial that wrote into its data would fail at once instead of changing the next
    trial's (copying the arrays for each trial instead cost about 0.25 s per trial on 20,000
    MNIST rows, mostly page faults, in the sweep's per-trial overhead)."""
    from tp_engine.data import load_dataset
    from worker.paths import cache_dir

    key = (cfg.dataset, cfg.seed, cfg.subset, cfg.whiten, cfg.data_path, str(cache_dir()))
    ds = _DATASETS.get(key)
    if ds is None:
        ds = load_dataset(cfg.dataset, seed=cfg.seed, subset=cfg.subset, whiten=cfg.whiten, data_path=cfg.data_path,
                          cache_dir=str(cache_dir()))
        for k in DATA_ARRAYS:
            getattr(ds, k).flags.writeable = False
        _DATASETS[key] = ds
        while len(_DATASETS) > _DATASETS_KEPT:
            _DATASETS.popitem(last=False)
    else:
        _DATASETS.move_to_end(key)
    import copy

    return replace(ds, whitening=copy.deepcopy(ds.whitening))


def _slim(ds):
    """What an epilogue needs of a dataset (a few test rows to draw and to sign the model with),
    so a queued epilogue does not hold a whole copy while the next trial loads its own."""
    empty = {k: getattr(ds, k)[:0].copy() for k in ("x_train", "y_train", "x_valid", "y_valid")}  # not views
    return replace(ds, **empty, x_test=ds.x_test[:8].copy(), y_test=ds.y_test[:8].copy())


class _Epilogues:
    """One background thread per process that logs finished trials' epilogues, in order."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._warmed = False

    def warm(self) -> None:
        """Once per process: import what logging a model takes in the background thread, while
        the trial trains, so a process's first epilogue is not slowed by them (the last epilogue
        of a process must be done within Tune's grace period when the sweep stops it)."""
        if not self._warmed:
            self._warmed = True
            self.submit(_warm_imports)

    def submit(self, fn: Callable, *args) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="tp-epilogues", daemon=True)
                self._thread.start()
        self._queue.put((fn, args))

    def _work(self) -> None:
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except Exception:  # noqa: BLE001  the run stays unsettled; the driver settles it
                logging.getLogger(__name__).warning("a trial's epilogue failed", exc_info=True)
            finally:
                self._queue.task_done()

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for every epilogue submitted so far; False if some are left after ``timeout``."""
        done = self._queue.all_tasks_done
        deadline = None if timeout is None else time.monotonic() + timeout
        with done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                done.wait(left)
        return True


def _warm_imports() -> None:
    import mlflow.models  # noqa: F401

    import worker.mlflow_model  # noqa: F401


EPILOGUES = _Epilogues()
DRAIN_S = 120.0


class FinishEpilogues:
    """Mixed into the Tune trainable of run_trial: a trial process being stopped (the sweep is
    ending, or Tune drops it) first logs what its trials left queued. Tune kills a process that
    takes too long; the driver then settles those trials from their checkpoints."""

    def cleanup(self):
        try:
            EPILOGUES.drain(DRAIN_S)
        finally:
            super().cleanup()


run_trial.__mixins__ = (FinishEpilogues,)


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
            import matplotlib.pyplot as plt

            fig = reconstruction_grid(res.model, ds)
            mlflow.log_figure(fig, "reconstructions.png")
            plt.close(fig)


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

"""One trial's configuration: everything a single training run needs.

This model is the contract shared by the engine CLI, the sweep spec (parameters are dotted paths
into it), the queue and the worker. It imports nothing heavier than Pydantic.

Defaults depend on the rule: a field left out takes the rule's default from ``RULE_DEFAULTS``
(tuned on the validation set), then the global default below.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tp_engine.data import DATASETS  # the dataset registry (no NumPy)
from tp_engine.optimizers import OPTIMIZERS  # the optimizer table (no NumPy)
from tp_engine.rules import RULES as _RULES  # noqa: E402  (the registry: no heavy imports)

RULES: tuple[str, ...] = tuple(_RULES)
Rule = Literal[RULES]  # type: ignore[valid-type]
Activation = Literal["tanh", "sigmoid", "relu", "leaky_relu", "linear"]
Loss = Literal["softmax_ce", "sigmoid_ce", "sigmoid_l2", "l2"]
DatasetName = Literal[DATASETS]  # type: ignore[valid-type]
OptimizerName = Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]


class OptimizerConfig(BaseModel):
    """A local optimizer. Each layer's parameters minimize their own local loss with it."""

    model_config = ConfigDict(extra="forbid")

    name: OptimizerName = "rmsprop_centered"
    lr: float = Field(0.001, gt=0, le=10)
    # rmsprop / rmsprop_centered: decay of the running averages; Lee et al. used 0.95.
    rho: float = Field(0.95, gt=0, lt=1)
    # sgd / rmsprop momentum; adam uses beta1 instead.
    momentum: float = Field(0.9, ge=0, lt=1)
    # rmsprop: inside the square root (Lee et al.: 1e-3). adam: added after the square root
    # (default 1e-8). None: that optimizer's default.
    eps: float | None = Field(None, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, gt=0, lt=1)
    # Clip each parameter's gradient to this L2 norm (the seed clipped at 100); None: no clipping.
    clip_norm: float | None = Field(None, gt=0)
    # L2 penalty added to the gradient before the update (PyTorch's coupled weight_decay, as the
    # drl/ddtp_linear authors use on feedback weights).
    weight_decay: float = Field(0.0, ge=0, le=1)


class TrialConfig(BaseModel):
    """Everything one run needs. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # What is compared.
    rule: Rule = "dtp"
    backend: Literal["numpy", "tensorflow"] = "numpy"
    device: Literal["auto", "cpu", "gpu"] = "auto"

    # Data.
    dataset: DatasetName = "mnist"
    data_path: str | None = None
    subset: int | None = Field(None, ge=10, description="use at most this many rows of each split")
    whiten: bool = False
    mode: Literal["classification", "autoencoder"] = "classification"

    # Network: input -> hidden... -> output (affine). The output nonlinearity belongs to the loss.
    hidden: list[Annotated[int, Field(ge=1, le=100_000)]] = Field(default_factory=lambda: [240] * 7, min_length=1)
    activation: Activation = "tanh"
    # None: softmax_ce for classification, sigmoid_ce for autoencoder.
    loss: Loss | None = None
    init: Literal["xavier", "xavier_normal", "orthogonal"] = "orthogonal"

    # Training.
    epochs: int = Field(3, ge=1, le=10_000)
    batch_size: int = Field(100, ge=1, le=65_536)
    seed: int = Field(0, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    # Multiplies both learning rates: one sweep can search around each rule's own default.
    lr_scale: float = Field(1.0, gt=0, le=1000)

    # Targets.
    alpha: float = Field(0.3277, gt=0, le=100, description="top-target step size")
    top_target: Literal["output", "last_hidden"] = "last_hidden"
    inv_threshold: float = Field(1e-2, gt=0, lt=0.5, description="clip margin before tanh/sigmoid inverses")
    gamma: float = Field(1e-3, gt=0, description="rlstp: regularization of the inverse")
    rinv_steps: int = Field(2, ge=0, le=100, description="rlstp: gradient steps of tanh/sigmoid f_rinv")
    rinv_lr: float = Field(0.5, gt=0, le=100)

    # Learned inverses (dtp).
    noise: float = Field(0.3598, ge=0, description="std of the corruption used to train inverses")
    noise_decay: bool = False
    schedule: Literal["per_batch", "per_epoch"] = "per_epoch"
    inverse_optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=0.00501))
    # Trained feedback (dtp, drl, ddtp_linear, ldrl): steps per batch, each with fresh noise;
    # feedback-only passes over the training set before the first epoch, and before every later one.
    feedback_iterations: int = Field(1, ge=1, le=1000)
    feedback_pretrain_epochs: int = Field(0, ge=0, le=1000)
    feedback_epochs_per_epoch: int = Field(0, ge=0, le=100)
    # Fixed random feedback drawn U(+-scale) (fwdtp).
    feedback_init_scale: float = Field(1e-3, gt=0, le=100)

    # A trial whose training loss grows past this multiple of its first epoch's ends as diverged,
    # like a non-finite loss (a loss 1000x its start is a blow-up, not learning); None: off.
    divergence_factor: float | None = Field(1000.0, gt=1)

    # Diagnostics: angle to backprop and local losses are measured on this many training rows.
    diag_size: int = Field(1000, ge=1)
    # TensorFlow path: compile the step with XLA (on CPU, not a step that solves linear systems,
    # lstp and rlstp: TensorFlow's own solve is ~4x faster than XLA's there).
    jit_compile: bool = True

    @model_validator(mode="before")
    @classmethod
    def _rule_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        rule = data.get("rule", "dtp")
        defaults = RULE_DEFAULTS.get(rule) if isinstance(rule, str) else None
        if not defaults:
            return data
        return merge(copy.deepcopy(defaults), data)

    @model_validator(mode="after")
    def _consistent(self) -> "TrialConfig":
        if self.mode == "autoencoder" and self.loss == "softmax_ce":
            raise ValueError("loss softmax_ce needs mode classification (autoencoder targets are pixels)")
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> scalar values (lists as strings), for MLflow params."""
        return flatten(self.model_dump())

    def config_hash(self) -> str:
        blob = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# Per-rule defaults live beside each rule (``Rule.defaults`` in tp_engine/rules/), each with its
# source; a key given by the user always wins.
RULE_DEFAULTS: dict[str, dict[str, Any]] = {name: r.defaults for name, r in _RULES.items()}


def merge(base: dict, over: dict) -> dict:
    """Deep-merge ``over`` into ``base`` (in place) and return it."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = merge(base[k], v)
        elif isinstance(v, BaseModel) and isinstance(base.get(k), dict):
            base[k] = merge(base[k], v.model_dump(exclude_unset=True))
        else:
            base[k] = v
    return base


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v))
        else:
            out[key] = v
    return out


def field_paths(model: type[BaseModel] = TrialConfig, prefix: str = "") -> list[str]:
    """Every dotted path into the config (for the sweep spec's parameter paths)."""
    paths: list[str] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths.extend(field_paths(ann, f"{prefix}{name}."))
        else:
            paths.append(f"{prefix}{name}")
    return paths


def set_path(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set a dotted path in a nested dict (creating levels), returning the dict."""
    node = data
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return data

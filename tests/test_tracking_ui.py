"""What a user sees first in the MLflow UI, against a real MLflow store: the experiment opens on
its runs (its kind is model training), each trial's run names its data (Dataset column), and the
parent run's description says where the rule comparison is."""
from __future__ import annotations

import numpy as np
from mlflow import MlflowClient

from worker import tracking


def test_experiment_kind_is_model_training_unless_the_user_chose_one(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    new = tracking.experiment_id(c, "fresh")
    assert c.get_experiment(new).tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"
    # An experiment made before the tag existed gets it; one whose kind a user set keeps it.
    old = c.create_experiment("older")
    assert tracking.TAG_EXPERIMENT_KIND not in c.get_experiment(old).tags
    assert tracking.experiment_id(c, "older") == old
    assert c.get_experiment(old).tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"
    mine = c.create_experiment("mine", tags={tracking.TAG_EXPERIMENT_KIND: "finetuning"})
    assert tracking.experiment_id(c, "mine") == mine
    assert c.get_experiment(mine).tags[tracking.TAG_EXPERIMENT_KIND] == "finetuning"


def test_parent_run_description_points_at_the_comparison(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(c, "e")
    run_id = tracking.parent_run(c, exp, "sw-0123456789ab", "name: e\n", "my study of rules")
    note = c.get_run(run_id).data.tags[tracking.TAG_NOTE]
    assert note.startswith("my study of rules\n\n")
    assert "sw-0123456789ab" in note and "comparison/comparison.md" in note


def test_dataset_input_names_the_data_and_tells_different_data_apart(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(c, "e")
    rng = np.random.default_rng(0)
    x, y = rng.random((300, 20), dtype=np.float32), rng.integers(0, 10, 300)
    digests = []
    for features in (x, x.copy(), x[:200]):
        run = c.create_run(exp)
        digests.append(tracking.log_dataset(c, run.info.run_id, "mnist", features, y[: len(features)]))
        (inp,) = c.get_run(run.info.run_id).inputs.dataset_inputs
        assert inp.dataset.name == "mnist" and inp.dataset.digest == digests[-1]
        assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train"
    assert digests[0] == digests[1] != digests[2]  # same rows, same digest; a subset differs

"""The Python API in one process: your own module and data, `load`, `evaluate`, bad
arguments. No Ray here (tests/api/test_fit_ray.py runs the distributed modes)."""

import re

import pytest
import torch
from support.api import diabetes, regressor, wine

import distbelief
from distbelief import ConfigError
from distbelief.cli import main

FAST = dict(iterations=150, batch_size=16, lr=0.05, eval_every=50, log_every=25)


class Frames(torch.nn.Module):
    """A user's own module: not a registered model, any input shape."""

    def __init__(self, features: int = 13, classes: int = 3):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(features, 32), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.body(x))


def test_a_module_trains_in_place_and_its_run_loads_back(tmp_path):
    (x, y), test = wine()
    torch.manual_seed(0)
    model = Frames()
    before = [p.detach().clone() for p in model.parameters()]
    summary = distbelief.fit(model, (x, y), test_data=test, run_dir=tmp_path / "run", **FAST)
    assert summary["iterations"] == 150 and summary["model"] == "custom"
    assert summary["test_accuracy"] >= 0.9, summary
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # The module now holds the trained weights: evaluating it gives the run's own numbers.
    again = distbelief.evaluate(model, test)
    assert again["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    loaded = distbelief.load(tmp_path / "run", model=Frames)
    torch.testing.assert_close(loaded(test[0]), model.eval()(test[0]))


def test_a_factory_and_a_dataset_without_test_data_evaluate_the_training_split():
    (x, y), _ = wine()
    data = torch.utils.data.TensorDataset(x, y)
    summary = distbelief.fit(lambda: Frames(), data, seed=3, **FAST)
    assert "test_accuracy" not in summary
    assert 0 <= summary["train_error"] <= 0.1, summary  # a full pass, not the running mean
    # Seeded: the factory is called after torch.manual_seed(seed), so a rerun is the same run.
    rerun = distbelief.fit(lambda: Frames(), data, seed=3, **FAST)
    assert rerun["train_loss"] == summary["train_loss"]


class Pairs(torch.utils.data.Dataset):
    """A map-style dataset of (numpy array, int) pairs."""

    def __init__(self, x, y):
        self.x, self.y = x.numpy(), y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_any_map_style_dataset_of_pairs_is_taken():
    (x, y), (tx, ty) = wine()
    summary = distbelief.fit(Frames(), Pairs(x, y), test_data=Pairs(tx, ty), **FAST)
    assert summary["test_accuracy"] >= 0.9


@pytest.mark.parametrize("model, data, message", [
    ("resnet20", None, "must be a torch.nn.Module"),
    (Frames(), ([], []), "is empty"),
    (Frames(), "labels", "map-style torch Dataset"),
    (Frames(classes=2), None, "has labels 0..2 but the model has 2 outputs"),
    (Frames(features=5), None, "cannot take train_data's inputs of shape (13,)"),
    (Frames(), "float labels", "labels must be one integer class index"),
])
def test_bad_arguments_are_one_config_error_and_write_nothing(tmp_path, model, data, message):
    train = wine()[0]
    if data == "float labels":
        data = (train[0], train[1].float())
    elif data == ([], []):
        data = torch.utils.data.TensorDataset(torch.zeros(0, 13), torch.zeros(0))
    data = train if data is None else data
    with pytest.raises(ConfigError, match=re.escape(message)):
        distbelief.fit(model, data, run_dir=tmp_path / "run", **FAST)
    assert not (tmp_path / "run").exists()


def test_test_data_the_model_cannot_take_is_refused_before_training(tmp_path):
    (x, y), (xt, yt) = wine()
    narrow = (xt[:, :5], yt)  # 5 features where the model takes 13
    with pytest.raises(ConfigError, match=re.escape(
            "cannot take test_data's inputs of shape (5,)")):
        distbelief.fit(Frames(), (x, y), test_data=narrow, run_dir=tmp_path / "run", **FAST)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_an_unknown_setting_is_named():
    with pytest.raises(ConfigError, match="unknown config field.*learning_rate"):
        distbelief.fit(Frames(), wine()[0], learning_rate=0.1)


def test_the_command_line_refuses_an_api_run_in_one_line(tmp_path, capsys):
    distbelief.fit(Frames(), wine()[0], run_dir=tmp_path / "run", **FAST)
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "given to distbelief.fit" in err[0], err
    with pytest.raises(distbelief.CheckpointError, match="pass it as load"):
        distbelief.load(tmp_path / "run")


def test_load_rebuilds_a_named_model_from_its_run(tmp_path):
    from distbelief.engine import Trainer

    config = distbelief.get_recipe("digits").replace(iterations=4, batch_size=16, eval_every=4)
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    model = distbelief.load(tmp_path / "run")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(x), trainer.model.eval()(x))
    assert "resnet20" in distbelief.list_models()
    assert isinstance(distbelief.create_model("resnet20"), torch.nn.Module)


@pytest.mark.subprocess
def test_the_fine_tuning_example_loads_torchvision_weights_and_learns():
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "examples" / "finetune_resnet.py"),
                           "--iterations", "60"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    accuracy = float(line.split("test accuracy ")[1].split("%")[0])
    assert "after 60 iterations" in line and accuracy >= 50, line  # 78% here; chance 10%


def test_a_run_resumes_through_the_api_and_plots_from_the_command_line(tmp_path):
    (x, y), test = wine()
    run = tmp_path / "run"
    settings = dict(FAST, checkpoint_every=50)
    first = distbelief.fit(lambda: Frames(), (x, y), test_data=test, run_dir=run,
                           **{**settings, "iterations": 100})
    summary = distbelief.fit(lambda: Frames(), (x, y), test_data=test, run_dir=run,
                             resume=True, **settings)
    assert first["iterations"] == 100 and summary["iterations"] == 150
    from distbelief.engine.rundir import read_jsonl

    trained = [r["iteration"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert trained == [25, 50, 75, 100, 125, 150]  # none repeated, none lost
    assert main(["plot", str(run), "-o", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "last.pt")]) == 2


def test_a_regression_model_s_loss_falls_and_no_error_rate_is_reported(tmp_path):
    train, test = diabetes()
    torch.manual_seed(0)
    model = regressor()
    before = distbelief.evaluate(model, test, loss="mse")["loss"]  # ~1: standardized targets
    summary = distbelief.fit(model, train, test_data=test, loss="mse", iterations=300,
                             batch_size=32, lr=0.02, eval_every=100, log_every=50,
                             run_dir=tmp_path / "run")
    assert summary["test_loss"] < 0.7 * before, (before, summary["test_loss"])
    assert not {"test_error", "test_accuracy"} & set(summary) and summary["train_error"] is None
    after = distbelief.evaluate(model, test, loss="mse")
    assert after["loss"] == pytest.approx(summary["test_loss"]) and "accuracy" not in after
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "x.png")]) == 2


def test_regression_targets_must_match_the_outputs():
    (x, y), _ = diabetes()
    with pytest.raises(ConfigError, match="2 target value.*1 outputs"):
        distbelief.fit(regressor(), (x, torch.stack([y, y], 1)), loss="mse", **FAST)
    with pytest.raises(ConfigError, match="loss='mse'"):
        distbelief.fit(regressor(), (x, y), **FAST)  # float labels for a classifier
    with pytest.raises(ConfigError, match="--loss mse needs real-valued targets"):
        distbelief.get_recipe("digits").replace(loss="mse")


def test_numpy_pairs_dataset_labels_and_odd_shapes_are_read_or_refused_in_one_line():
    (x, y), test = wine()
    summary = distbelief.fit(Frames(), (x.numpy(), y.numpy()), test_data=test, **FAST)
    assert summary["test_accuracy"] >= 0.9  # a pair of numpy arrays, as scikit-learn gives
    floats = [(x[i], 0.7) for i in range(len(y))]
    with pytest.raises(ConfigError, match="labels must be one integer class index"):
        distbelief.fit(Frames(), floats, **FAST)  # refused, never truncated to class 0
    with pytest.raises(ConfigError, match="one row per example"):
        distbelief.fit(Frames(), (x, torch.tensor(1)), **FAST)
    with pytest.raises(ConfigError, match="given by fit's arguments"):
        distbelief.fit(Frames(), (x, y), data="digits", **FAST)


def test_evaluate_leaves_the_module_as_it_was_and_5d_inputs_are_not_views():
    class Clips(torch.nn.Module):  # N x C x T x H x W inputs: one clip each, not 10 crops
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3, 4)))

    x = torch.randn(32, 1, 4, 6, 6)
    y = (x.mean((1, 2, 3, 4)) > 0).long()
    model = Clips().train()
    result = distbelief.evaluate(model, (x, y))
    assert result["images"] == 32 and model.training
    summary = distbelief.fit(model, (x, y), test_data=(x, y), iterations=20, batch_size=8,
                             lr=0.05, eval_every=10, log_every=10)
    assert summary["test_loss"] > 0 and summary["iterations"] == 20

"""Weights in torchvision's format: `distbelief export` writes them, `--init-from` starts a run
from them, torchvision's own ResNet-50 loads them strictly."""

import pytest
import torch

from distbelief.cli import main
from distbelief.distributed.downpour.replica import initial_vector
from distbelief.distributed.flat import model_vector
from distbelief.engine import Trainer
from distbelief.engine.config import TrainConfig
from distbelief.engine.weights import export_state_dict
from distbelief.errors import CheckpointError, ConfigError
from distbelief.recipes import get_recipe

import distbelief


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("weights") / "run"
    config = get_recipe("digits").replace(iterations=3, batch_size=16, eval_every=3)
    Trainer(config, run).fit()
    return run


def test_export_then_init_from_starts_from_identical_outputs(digits_run, tmp_path):
    out = tmp_path / "r20.pt"
    assert main(["export", str(digits_run), "--torchvision", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert "conv1.weight" in state and "fc.bias" in state and "format" not in state
    trained = distbelief.load(digits_run)
    config = get_recipe("digits").replace(iterations=3, batch_size=16, init_from=str(out),
                                          seed=7)  # another seed: the file decides
    started = Trainer(config).model.eval()
    for name, value in trained.state_dict().items():
        assert torch.equal(started.state_dict()[name], value), name
    # Identical outputs, in one memory format (the recipe trains channels-last, whose kernels
    # round differently from the contiguous ones).
    started = started.to(memory_format=torch.contiguous_format)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(started(x), trained(x))
    # Downpour's driver starts its shards from the same vector.
    from distbelief.data import build_data

    data = build_data(config, torch.device("cpu"))
    vector, _ = initial_vector(config, data)
    assert torch.equal(vector, model_vector(trained)[0])
    # ... and partitioned, from the file's weights (read by the driver, not drawn by name).
    from distbelief.distributed.downpour.layout import server_layout
    from distbelief.distributed.flat import BlockFlat

    cut = config.replace(mode="downpour", partitions=2, ps_shards=3)
    starts, plan, _, _ = server_layout(cut, data)
    whole = BlockFlat(plan.modules_of(trained)).vector()
    assert torch.equal(torch.cat([torch.from_numpy(s) for s in starts]), whole)


def test_torchvision_resnet50_loads_an_export_strictly(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    run = tmp_path / "run"
    config = TrainConfig().replace(model="resnet50", variant="v1.5", data="synthetic", synthetic_size=64,
                         synthetic_shape=(3, 32, 32), batch_size=4, iterations=1, eval_every=1,
                         eval_batch_size=8)
    Trainer(config, run).fit()
    assert main(["export", str(run), "--torchvision", str(tmp_path / "r50.pt")]) == 0
    assert "note" not in capsys.readouterr().err
    theirs = torchvision.models.resnet50(num_classes=10)
    theirs.load_state_dict(torch.load(tmp_path / "r50.pt", weights_only=True), strict=True)
    ours = distbelief.load(run)
    for name, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], value), name
    # Batch statistics: after one step the running ones are still mostly their initial 0 and 1,
    # through which 50 layers in eval mode overflow (in torchvision's model as in ours).
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(theirs.train()(x), ours.train()(x))


def test_a_mismatched_file_is_one_line_and_nothing_is_written(digits_run, tmp_path, capsys):
    out = tmp_path / "r20.pt"
    export_state_dict(digits_run, out)
    run = tmp_path / "r32"
    code = main(["train", "--model", "resnet32", "--init-from", str(out), "--out", str(run),
                 "--iterations", "2", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "does not fit resnet32: missing layer1.3" in err[0]
    assert not run.exists()
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer(get_recipe("digits").replace(init_from=str(tmp_path / "none.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a file torch wrote")
    with pytest.raises(ConfigError, match="not a readable state dict"):
        Trainer(get_recipe("digits").replace(init_from=str(tmp_path / "junk.pt")))


def test_export_never_overwrites_and_needs_a_checkpoint(digits_run, tmp_path, capsys):
    out = tmp_path / "r20.pt"
    out.write_bytes(b"earlier result")
    with pytest.raises(CheckpointError, match="exists"):
        export_state_dict(digits_run, out)
    assert out.read_bytes() == b"earlier result"
    assert main(["export", str(tmp_path / "nothing"), "--torchvision", str(tmp_path / "x.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_exporting_the_paper_s_bottleneck_variant_says_torchvision_computes_otherwise(tmp_path,
                                                                                      capsys):
    run = tmp_path / "run"
    config = TrainConfig().replace(model="resnet50", data="synthetic", synthetic_size=16,
                         synthetic_shape=(3, 32, 32), batch_size=4, iterations=1, eval_every=1,
                         eval_batch_size=8)
    Trainer(config, run).fit()
    assert main(["export", str(run), "--torchvision", str(tmp_path / "r50.pt")]) == 0
    err = capsys.readouterr().err
    assert "paper's variant" in err and "--variant v1.5" in err
    with pytest.raises(ConfigError, match="--variant applies to the ImageNet ResNets"):
        Trainer(get_recipe("digits").replace(variant="v1.5"))


def test_a_resume_does_not_need_the_init_file_again(digits_run, tmp_path):
    weights = tmp_path / "r20.pt"
    export_state_dict(digits_run, weights)
    run = tmp_path / "run"
    config = get_recipe("digits").replace(batch_size=16, eval_every=3, init_from=str(weights))
    Trainer(config.replace(iterations=3), run).fit()
    weights.unlink()  # moved away: the checkpoint holds the weights now
    summary = Trainer(config.replace(iterations=6), run, resume=True).fit()
    assert summary["iterations"] == 6
    with pytest.raises(CheckpointError, match="--variant"):
        Trainer(config.replace(iterations=9, variant="paper"), run, resume=True)

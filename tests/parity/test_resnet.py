"""A torchvision state_dict loads into our matching variant (strict) and gives identical outputs."""

import pytest
import torch
import torchvision

from distbelief.models import create_model


def randomized(model):
    """Randomize BN statistics and affine terms too, so parity cannot hide behind 0s and 1s."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("name, variant", [("resnet18", "paper"), ("resnet50", "v1.5")])
def test_torchvision_state_dict_gives_identical_outputs(name, variant):
    reference = randomized(getattr(torchvision.models, name)())
    ours = create_model(name, variant=variant).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


def test_paper_bottleneck_differs_from_torchvision():
    """Same weights, different stride placement: the outputs must differ (the variant is real)."""
    reference = randomized(torchvision.models.resnet50())
    ours = create_model("resnet50").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert not torch.allclose(ours(x), reference(x))

"""A model as the server's flat vector."""

import torch

from distbelief.distributed.flat import load_model_vector, model_vector


def test_model_vector_round_trip_with_channels_last():
    from distbelief.models import create_model

    model = create_model("resnet20", num_classes=10, in_chans=1)
    vector, n_params = model_vector(model)
    assert n_params == sum(p.numel() for p in model.parameters())
    other = create_model("resnet20", num_classes=10, in_chans=1).to(
        memory_format=torch.channels_last)
    load_model_vector(other, vector)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k

"""The preamble every trainer shares (`BaseTrainer.open_run`, `RunLifecycle.prepare`): the
seed is set before the model is built, whatever the process's RNG was, in every mode, so a
distributed run starts from exactly the single process's initial model. No Ray is started:
the distributed trainers acquire it in `start`, not in their constructors."""

import numpy as np
import torch

from distbelief.distributed import DownpourTrainer, SandblasterTrainer
from distbelief.distributed.flat import model_vector
from distbelief.engine import Trainer
from distbelief.recipes import get_recipe


def initial(config) -> torch.Tensor:
    return model_vector(Trainer(config.replace(mode="single")).model)[0]


def test_the_seed_sets_the_initial_model_whatever_the_rng_was():
    c = get_recipe("digits").replace(seed=3)
    torch.manual_seed(123)
    first = initial(c)
    torch.rand(1000)  # the process's RNG moved on
    assert torch.equal(initial(c), first)
    assert not torch.equal(initial(c.replace(seed=4)), first)


def test_downpour_and_sandblaster_start_from_the_single_processs_initial_model():
    downpour = get_recipe("digits-downpour").replace(seed=5)
    torch.manual_seed(123)
    starts = DownpourTrainer(downpour).starts
    assert torch.equal(torch.from_numpy(np.concatenate(starts)), initial(downpour))
    sandblaster = get_recipe("digits-sandblaster").replace(seed=5)
    torch.rand(1000)
    trainer = SandblasterTrainer(sandblaster)
    # (Its batch is the whole split, batch size 0, which the single process does not take.)
    assert torch.equal(trainer.initial, initial(sandblaster.replace(mode="single", batch_size=64)))
    assert trainer.config.sandblaster.portions == 32  # resolved for the data by the preamble

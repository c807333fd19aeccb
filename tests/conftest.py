"""Shared test helpers: tiny configs, seeded params, hypothesis settings for 2-core CI."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from gptfn import init_params
from tests.helpers import randomize_ln_and_biases, tiny_config

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("GPTFN_HYPOTHESIS_EXAMPLES", "15")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("ci")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny():
    """(config, params) of a 2-layer, 32-wide model: seeded random weights, with layer
    norms and biases perturbed so that every tensor matters."""
    cfg = tiny_config()
    return cfg, randomize_ln_and_biases(init_params(cfg, seed=0))

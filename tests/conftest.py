"""Shared test configuration: a bounded, derandomised hypothesis profile for 2-core CI."""
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def vgg7_checkpoint(tmp_path):
    """A freshly initialised VGG7 saved in the models.train checkpoint format (the seed-000
    identity holds for any weights, so no training is needed to exercise the CLI)."""
    train = pytest.importorskip("models.train")
    torch.manual_seed(0)
    kw = {"num_classes": 10, "in_channels": 3}
    model = train.build_model("vgg7", **kw).eval()
    meta = {"model": "vgg7", "kwargs": kw, "data": "digits32", "input_shape": [3, 32, 32], "normalize": "none"}
    path = tmp_path / "vgg7_random.pt"
    train.save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation on a shared CPU.  Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_collection_modifyitems(config, items):
    from linop.backend import cupy_available

    if cupy_available():
        return
    skip = pytest.mark.skip(reason="needs cupy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Fixtures of the training tests: the tiny model directory, a few HR images, a local LPIPS backbone."""

import pytest
import torch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("open_clip")
    from mor_model.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    root = tmp_path_factory.mktemp("hr")
    Image.fromarray(skdata.astronaut()[::4, ::4]).save(root / "astronaut.png")
    Image.fromarray(skdata.chelsea()[::2, ::2]).save(root / "chelsea.png")
    return root


@pytest.fixture(scope="module")
def alex_weights(tmp_path_factory):
    """A local 'torchvision alexnet' checkpoint (random weights: only the loading path matters)."""
    tv = pytest.importorskip("torchvision")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        features = tv.models.alexnet(weights=None).features
    path = tmp_path_factory.mktemp("lpips") / "alexnet-local.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


@pytest.fixture
def one_cpu_thread():
    """PyTorch's multi-threaded CPU backward of LPIPS' AlexNet is not bitwise repeatable from run to run
    (measured here: with 2 threads, the LPIPS gradient of the second step differed in 4 of 5 identical
    runs; with 1 thread in none), so bitwise checks run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """The tiny SGM-layout SDXL checkpoint (shared.tiny.TinyModel), built once per session."""
    from shared.tiny import make_tiny

    return make_tiny("sdxl", str(tmp_path_factory.mktemp("tiny-sdxl")), seed=0)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """The tiny BFL-layout FLUX checkpoint and its VAE/CLIP-L/T5 files, built once per session."""
    from shared.tiny import make_tiny

    return make_tiny("flux", str(tmp_path_factory.mktemp("tiny-flux")), seed=0)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/qrlora (bases, tiny models, tokenizers);
    subprocesses inherit the variable."""
    folder = str(tmp_path_factory.mktemp("qrlora-cache-session"))
    old = os.environ.get("QRLORA_CACHE")
    os.environ["QRLORA_CACHE"] = folder
    yield folder
    if old is None:
        os.environ.pop("QRLORA_CACHE", None)
    else:
        os.environ["QRLORA_CACHE"] = old


@pytest.fixture(scope="module")
def single_threaded():
    """Thousands of tiny tensor ops: one thread avoids OpenMP overhead on busy CPUs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

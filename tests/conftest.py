import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # for ``tests.hosts``; the core is imported only as ``qrlora``


def _load_extension_package():
    """The WebUI extension as ``qrlora_ext``, loaded by path exactly as ``scripts/qrlora.py`` does
    (it is not installed: only a WebUI loads it), so tests can ``from qrlora_ext import syntax``."""
    spec = importlib.util.spec_from_file_location("qrlora_bootstrap", os.path.join(ROOT, "extension", "_bootstrap.py"))
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    return bootstrap.load_package("qrlora_ext", os.path.join(ROOT, "extension"))


_load_extension_package()


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """The tiny SGM-layout SDXL checkpoint (qrlora.tiny.TinyModel), built once per session."""
    from qrlora.tiny import make_tiny

    return make_tiny("sdxl", str(tmp_path_factory.mktemp("tiny-sdxl")), seed=0)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """The tiny BFL-layout FLUX checkpoint and its VAE/CLIP-L/T5 files, built once per session."""
    from qrlora.tiny import make_tiny

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

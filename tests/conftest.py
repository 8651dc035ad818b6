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

"""The extension keeps working when other extensions already own the top-level names
``shared``, ``extension`` and ``trainer`` in ``sys.modules`` (A1111 extensions commonly do
``import modules.shared as shared``-style imports; first import wins for everyone)."""

import os
import subprocess
import sys

import pytest

from tests.hosts.harness import ROOT
from tests.hosts.world import make_world

CHILD = r'''
import sys, types, torch
sys.path.insert(0, ROOT)
from tests.hosts import models          # uses the real core, imported before the foreign modules
from tests.hosts.harness import Host

trees = {"a1111": models.a1111_sdxl(CKPT)}   # test scaffolding built with the real core first
_probe = Host("forge", WORLD, QRLORA, basis_dir=BASIS)   # Forge's stand-in backend is needed for its tree
trees["forge"] = models.forge_sdxl(CKPT)
_probe.close()
for name in [k for k in sys.modules if k.startswith("qrlora")]:
    del sys.modules[name]                # our packages load afresh, after the foreign modules exist

for name in [k for k in sys.modules if k.split(".")[0] in ("shared", "extension", "trainer")]:
    del sys.modules[name]
foreign = {}
for name in ("shared", "extension", "trainer"):
    m = types.ModuleType(name)
    m.__path__ = []                      # a package with nothing in it
    m.FOREIGN = True
    m.opts = object()                    # looks like modules.shared to whoever imported it
    sys.modules[name] = foreign[name] = m

for kind in ("a1111", "forge"):
    h = Host(kind, WORLD, QRLORA, lora_dir="", basis_dir=BASIS)
    h.load_model(trees[kind])
    before = {n: p.clone() for n, p in (h.sd_model.named_parameters() if kind == "a1111"
              else h.sd_model.forge_objects.unet.model.named_parameters())}
    p = h.generate("<qrlora:dog:1>")
    assert not p.comments, p.comments
    assert p.extra_generation_params["QR-LoRA hashes"].startswith("dog: ")
    after = dict(h.sd_model.named_parameters() if kind == "a1111" else h.sd_model.forge_objects.unet.model.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) > 10, changed
    h.generate("no tags")
    after = dict(h.sd_model.named_parameters() if kind == "a1111" else h.sd_model.forge_objects.unet.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    h.close()

for name, m in foreign.items():
    assert sys.modules[name] is m and m.FOREIGN, name
    assert not [k for k in sys.modules if k.startswith(name + ".")], name
assert "qrlora" in sys.modules and "qrlora.deltar" in sys.modules
print("OK")
'''


@pytest.fixture(scope="module")
def world(tiny_sdxl, tmp_path_factory):
    return make_world(str(tmp_path_factory.mktemp("ext-safety")), tiny_sdxl.checkpoint)


def test_foreign_shared_extension_trainer_modules(world):
    header = (f"ROOT = {ROOT!r}\nWORLD = {world.root!r}\nQRLORA = {world.qrlora_dir!r}\n"
              f"BASIS = {world.basis_dir!r}\nCKPT = {world.checkpoint!r}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", header + CHILD], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout[-3000:] + out.stderr[-3000:]


def test_forge_does_not_keep_our_folders_importable(world):
    """Forge leaves every extension folder on ``sys.path``; ours would make ``shared``,
    ``extension`` and ``trainer`` importable by any other extension. The entry file takes it off."""
    from tests.hosts.harness import Host

    h = Host("forge", world.root, world.qrlora_dir, basis_dir=world.basis_dir)
    try:
        assert not h.root_left_on_path
        assert not any(os.path.realpath(p) == os.path.realpath(ROOT) for p in sys.path if p)
    finally:
        h.close()

"""The X/Y/Z plot axes against the stand-in of ``scripts/xyz_grid.py`` (tests/hosts/xyz_grid.py)
in both hosts: registered once, each cell's tags rewritten and applied exactly, bad values
stopped by ``confirm``, a λ sweep computing the basis at most once."""

from types import SimpleNamespace

import pytest

from qrlora_ext import xyz
from tests.hosts.world import check_applied, make_world, open_host

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def world(tiny_sdxl, tmp_path_factory):
    return make_world(str(tmp_path_factory.mktemp("ext-xyz-world")), tiny_sdxl.checkpoint)


@pytest.fixture(params=["a1111", "forge"])
def host(request, world, tmp_path):
    h = open_host(request.param, world, basis_dir=str(tmp_path / "empty-basis-cache"))  # the basis is computed here
    yield h
    h.close()


def run(host, prompt, *axes, hr_prompt=None):
    p = SimpleNamespace(prompt=prompt, hr_prompt=hr_prompt, seed=1)
    return host.xyz.run(p, list(axes), lambda pc: (pc, host.generate(pc.prompt, pc.hr_prompt)))


def test_axes_registered_once(host):
    labels = [o.label for o in host.xyz.axis_options]
    assert labels == ["Nothing", "Seed", xyz.LABEL_LAMBDA, xyz.LABEL_FILE, xyz.LABEL_BLOCKS]
    host.script_callbacks.before_ui_callback()  # the UI is rebuilt (Reload UI)
    assert [o.label for o in host.xyz.axis_options].count(xyz.LABEL_LAMBDA) == 1
    by_label = {o.label: o for o in host.xyz.axis_options}
    assert by_label[xyz.LABEL_FILE].choices() == ["dog", "style"]
    assert {"all", "content", "style"} <= set(by_label[xyz.LABEL_BLOCKS].choices())


def test_lambda_sweep_applies_each_value_and_computes_the_basis_at_most_once(host, world):
    cells = run(host, "a dog <qrlora:dog:1> <qrlora:style:0.3>", (xyz.LABEL_LAMBDA, "dog=0.2, dog=0.5, dog=1.5"))
    assert [c[1][0] for c in cells] == [f"{xyz.LABEL_LAMBDA}: dog={v}" for v in ("0.2", "0.5", "1.5")]
    assert host.engine.resolver.computations <= 1
    pc, p = cells[-1][2]
    assert pc.prompt == "a dog <qrlora:dog:1.5> <qrlora:style:0.3>" and not p.comments, p.comments
    check_applied(host, world, host.original, {"dog": 1.5, "style": 0.3})
    # a bare λ changes every tag; the hires prompt follows
    cells = run(host, "<qrlora:dog:1> <qrlora:style:te=0>", (xyz.LABEL_LAMBDA, "0.25"), hr_prompt="<qrlora:dog>")
    pc, _ = cells[0][2]
    assert (pc.prompt, pc.hr_prompt) == ("<qrlora:dog:0.25> <qrlora:style:0.25:te=0>", "<qrlora:dog:0.25>")
    assert host.engine.resolver.computations <= 1


def test_file_and_block_weight_axes(host, world):
    ones = "1,1,1,1,1,1,1,1,1,1,1,1"
    cells = run(host, "<qrlora:dog:0.7:te=0.7>", (xyz.LABEL_FILE, "dog, style"), (xyz.LABEL_BLOCKS, f'content, "{ones}"'))
    assert [c[0] for c in cells] == [["dog", "content"], ["dog", ones], ["style", "content"], ["style", ones]]
    pc, p = cells[2][2]
    assert pc.prompt == "<qrlora:style:0.7:te=0.7:lbw=content>" and not p.comments, p.comments
    pc, p = cells[3][2]
    assert pc.prompt == f"<qrlora:style:0.7:te=0.7:lbw={ones}>" and not p.comments, p.comments
    check_applied(host, world, host.original, {"style": 0.7})  # the last cell is what is applied now
    assert run(host, "no tag", (xyz.LABEL_FILE, "dog"))[0][2][0].prompt == "no tag <qrlora:dog>"


@pytest.mark.parametrize("axis, values, message", [
    (xyz.LABEL_LAMBDA, "0.5, x", "'x' is not λ or NAME=λ"),
    (xyz.LABEL_LAMBDA, "cat=0.5", "no <qrlora:cat…> tag"),
    (xyz.LABEL_FILE, "dog, nothere", "nothere"),
    (xyz.LABEL_BLOCKS, "content, NOPE", "unknown preset 'NOPE'"),
    (xyz.LABEL_BLOCKS, '"1,0,1"', "lbw= has 3 weights"),
])
def test_bad_values_stop_before_the_grid(host, axis, values, message):
    generated = []
    p = SimpleNamespace(prompt="<qrlora:dog:1>", hr_prompt=None)
    with pytest.raises(RuntimeError, match=message):
        host.xyz.run(p, [(axis, values)], generated.append)
    assert not generated

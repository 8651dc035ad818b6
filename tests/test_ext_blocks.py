"""lbw= block lists and presets against the SGM/BFL block structure of the tiny SDXL and FLUX
checkpoints (no host): which block each layer is in, what each preset weights."""

import re

import pytest

from qrlora import archs
from qrlora.checkpoint import SafetensorsFile
from qrlora_ext import blocks


def targets(checkpoint, arch):
    return archs.get(arch).linear_targets(SafetensorsFile(checkpoint).shapes())


def sgm_block(key):
    """The block from the SGM key, read independently of blocks.block_of."""
    m = re.match(r"model\.diffusion_model\.(input_blocks|middle_block|output_blocks)\.?(\d*)", key)
    if key.startswith("conditioner.embedders."):
        return "BASE"
    kind, index = m.group(1), m.group(2)
    return "M00" if kind == "middle_block" else ("IN" if kind == "input_blocks" else "OUT") + index.zfill(2)


def test_sdxl_layers_map_to_their_sgm_block(tiny_sdxl):
    ts = targets(tiny_sdxl.checkpoint, "sdxl")
    for t in ts:
        assert blocks.block_of("sdxl", t.key) == sgm_block(t.key), t.key
    # the 12-value list is exactly the blocks that hold targeted layers (SDXL's transformer blocks)
    twelve, twenty = blocks.layouts_for("sdxl")
    assert {blocks.block_of("sdxl", t.key) for t in ts} == set(twelve.ids)
    # the 20-value list is BASE plus every input/middle/output block the checkpoint has
    keys = SafetensorsFile(tiny_sdxl.checkpoint).keys
    found = {sgm_block(k) for k in keys
             if re.match(r"model\.diffusion_model\.(input_blocks|middle_block|output_blocks)", k)} | {"BASE"}
    assert found == set(twenty.ids)
    assert twelve.ids == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00",
                          "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")


def test_flux_layers_map_to_double_and_single_blocks(tiny_flux):
    ts = targets(tiny_flux.checkpoint, "flux")
    seen = set()
    for t in ts:
        m = re.match(r"transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.", t.name)
        expected = ("D" if m.group(1) == "transformer_blocks" else "S") + m.group(2).zfill(2)
        assert blocks.block_of("flux", t.key) == expected, (t.name, t.key)
        seen.add(expected)
    assert seen == {"D00", "D01", "S00", "S01"}
    lbw61, core57 = blocks.layouts_for("flux")
    assert lbw61.ids[:4] == ("CLIP", "T5", "IN", "D00") and lbw61.ids[21:23] == ("D18", "S00")
    assert lbw61.ids[-1] == "OUT" and lbw61.length == 61 and core57.ids == lbw61.ids[3:-1]
    for key, block in (("img_in.weight", "IN"), ("model.diffusion_model.final_layer.linear.weight", "OUT"),
                       ("time_in.in_layer.weight", "IN"), ("model.diffusion_model.single_blocks.37.linear1.weight", "S37")):
        assert blocks.block_of("flux", key) == block


@pytest.fixture
def presets(tmp_path):
    return blocks.Presets(lambda: str(tmp_path))


def test_sdxl_presets_by_diffusers_block(tiny_sdxl, presets):
    """B-LoRA's blocks by their official diffusers names; ALL keeps OUT00-OUT02 (lbw's 17-value ALL
    turns them off on SDXL)."""
    ts = targets(tiny_sdxl.checkpoint, "sdxl")

    def weighted(preset):
        w = blocks.resolve(preset, "sdxl", presets)
        return {t.name: w.for_key(t.key) for t in ts}

    assert set(weighted("ALL").values()) == {1.0}
    assert set(weighted("none").values()) == {0.0}
    for preset, block in (("content", "unet.up_blocks.0.attentions.0."), ("style", "unet.up_blocks.0.attentions.1.")):
        w = weighted(preset)
        assert {n for n, v in w.items() if v} == {t.name for t in ts if t.name.startswith(block)}, preset
        assert all(v in (0.0, 1.0) for v in w.values())
    te = weighted("TE")
    assert {n for n, v in te.items() if v} == {t.name for t in ts if t.name.startswith(("te1.", "te2."))}
    mid = weighted("MIDALL")
    assert {n for n, v in mid.items() if v} == {t.name for t in ts if t.name.startswith(("te1.", "te2.", "unet.mid_block."))}


def test_flux_presets(tiny_flux, presets):
    ts = targets(tiny_flux.checkpoint, "flux")
    double = blocks.resolve("double", "flux", presets)
    assert {t.name for t in ts if double.for_key(t.key)} == {t.name for t in ts if ".transformer_blocks." in t.name}
    assert all(blocks.resolve("ALL", "flux", presets).for_key(t.key) == 1.0 for t in ts)
    with pytest.raises(blocks.BlockError, match="preset 'content' has no FLUX list"):
        blocks.resolve("content", "flux", presets)


def test_lists_need_the_architecture_s_length(presets):
    assert blocks.resolve(",".join(["0.5"] * 20), "sdxl", presets).layout.length == 20
    with pytest.raises(blocks.BlockError, match=r"lbw= has 61 weights; SDXL takes 12 weights \(BASE, IN04"):
        blocks.resolve(",".join(["1"] * 61), "sdxl", presets)
    with pytest.raises(blocks.BlockError, match=r"unknown preset 'ALLL' \(known: .*all.*\)"):
        blocks.resolve("ALLL", "sdxl", presets)


def test_users_presets_file_extends_and_overrides(tmp_path):
    logged = []
    p = blocks.Presets(lambda: str(tmp_path), log=logged.append)
    (tmp_path / blocks.USER_FILE_NAME).write_text(
        "# mine\nMYOUT:1,0,0,0,0,0,0,0,0,1,1,1\nALL:0.5,1,1,1,1,1,1,1,1,1,1,1\nBROKEN:1,2\nBAD:1,x,0,0,0,0,0,0,0,0,0,0\n",
        encoding="utf-8")
    assert blocks.resolve("myout", "sdxl", p).values[9:] == (1.0, 1.0, 1.0)
    assert blocks.resolve("ALL", "sdxl", p).values[0] == 0.5  # the user's own ALL wins on SDXL
    assert blocks.resolve("ALL", "flux", p).values == (1.0,) * 61  # the built-in FLUX ALL stays
    assert len(logged) == 2 and "line 4 (BROKEN): 2 weights" in logged[0] and "weight 2 ('x')" in logged[1]
    p.lookup("myout")
    assert len(logged) == 2  # each bad line is reported once
    (tmp_path / blocks.USER_FILE_NAME).write_text("MYOUT:0,0,0,0,0,0,0,0,0,0,0,1\n", encoding="utf-8")
    import os
    os.utime(tmp_path / blocks.USER_FILE_NAME, ns=(1, 10 ** 18))
    assert blocks.resolve("myout", "sdxl", p).values[-2:] == (0.0, 1.0)  # re-read when the file changes

"""An adapter's concept on the lab base: its data set shows the new label under its own word,
and the before/after scoring of the trainer's samples counts it."""

import os

import pytest
import torch
from PIL import Image

from qrlora.errors import UserError
from trainer.lab import concept, score, world


def _read_png(path):
    rgb = torch.frombuffer(bytearray(Image.open(path).convert("RGB").tobytes()), dtype=torch.uint8)
    return rgb.view(32, 32, 3).permute(2, 0, 1)


def test_the_data_set_shows_the_new_pattern_under_its_word(tmp_path):
    prompts = concept.write_dataset(str(tmp_path / "striped"), "pattern", "striped", images=8, prompts=4, seed=3)
    pngs = sorted(p for p in os.listdir(tmp_path / "striped") if p.endswith(".png"))
    assert len(pngs) == 8
    for name in pngs:
        caption = (tmp_path / "striped" / name.replace(".png", ".txt")).read_text(encoding="utf-8").strip()
        labels = concept.labels_of(caption)
        assert labels[2] == "striped" and "striped" in caption.split()
        assert score.read(_read_png(tmp_path / "striped" / name)).labels == labels
    lines = open(prompts, encoding="utf-8").read().splitlines()
    assert len(lines) == 4 and all(" striped " in line and "--d " in line and "--l 1" in line for line in lines)


def test_scoring_counts_the_concept_in_the_first_and_last_samples(tmp_path):
    from trainer.prompts import load_prompts

    prompts = concept.write_dataset(str(tmp_path / "data"), "pattern", "striped", images=2, prompts=6, seed=0)
    samples = tmp_path / "sample"
    samples.mkdir()
    for p in load_prompts(prompts):
        colour, shape, pattern, background = concept.labels_of(p.prompt)
        for tag, shown in (("first", "solid"), ("000010", "solid"), ("000020", pattern)):
            scene = world.Scene(colour, shape, shown, background, 16.0, 16.0, 18.0)
            Image.fromarray(world.render(scene).permute(1, 2, 0).numpy()).save(samples / f"run_{tag}_{p.index:02d}_{p.seed}.png")
    got = concept.score_samples(str(samples), prompts, "pattern", "striped")
    assert (got["concept_before"], got["concept_after"], got["step_after"]) == (0.0, 1.0, 20)
    assert got["colour_before"] == got["colour_after"] == got["background_after"] == 1.0
    os.remove(next(samples.glob("run_first_03_*.png")))
    with pytest.raises(UserError, match=r"lack prompt\(s\) \[3\]"):
        concept.score_samples(str(samples), prompts, "pattern", "striped")


@pytest.mark.parametrize("kind, value", [("pattern", "solid"), ("shape", "circle"), ("shape", "blob"), ("colour", "red")])
def test_a_concept_the_base_already_knows_or_the_world_lacks_is_refused(kind, value):
    with pytest.raises(UserError, match="concept"):
        concept.vocabulary(kind, value)

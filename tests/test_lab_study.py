"""The merge study (trainer/lab/study.py): config checks before training, resuming without
training an adapter twice, the merges' maths, Wilson intervals, and a shrunk end-to-end run
on an untrained lab base that fills the whole table."""

import json
import math

import pytest
import torch
from qrlora.errors import UserError

from trainer.lab import merges, study
from trainer.lab.__main__ import main as lab_main

TINY_STUDY = """
[base]
checkpoint = "base/lab.safetensors"
config_dir = "base/config"

[train]
rank = 2
batch_size = 4

[content]
kind = "shape"
value = "heart"
steps = 2
images = 8

[style]
kind = "pattern"
value = "striped"
steps = 2
images = 8

[merge]
ziplora_steps = 20

[eval]
samples = 4
seeds = [1, 2]
steps = 2
"""


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory):
    """A folder with an untrained lab base (same builder and writer as the real one) and the
    shrunk study config beside it."""
    from trainer.lab import model

    folder = tmp_path_factory.mktemp("study")
    (folder / "base").mkdir()
    model.write(model.build(0), str(folder / "base" / "lab.safetensors"), str(folder / "base" / "config"),
                {"qrlora.lab": "test"})
    (folder / "study.toml").write_text(TINY_STUDY)
    return folder


def _config(folder, old, new):
    text = TINY_STUDY.replace(old, new)
    assert text != TINY_STUDY
    path = folder / "bad.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("old, new, names", [
    ('kind = "shape"', 'kind = "colour"', ["content.kind", "'colour'", "shape"]),
    ('value = "heart"', 'value = "hexagon"', ["content.value", "'hexagon'", "diamond, ring, heart, star"]),
    ('value = "striped"', 'value = "solid"', ["style.value", "'solid'", "striped, checkered, dotted"]),
    ("seeds = [1, 2]", 'seeds = [1, 2]\nscorers = ["content", "beauty"]',
     ["eval.scorers entry", "'beauty'", "content, style, both, leakage, retention"]),
    ("ziplora_steps = 20", 'ziplora_steps = 20\nmethods = ["lora_sum", "average"]',
     ["merge.methods entry", "'average'", "qrlora_sum, lora_sum, ziplora, blora"]),
])
def test_a_bad_study_config_gets_one_sentence_before_any_training(study_folder, tmp_path, monkeypatch, capsys,
                                                                   old, new, names):
    def no_training(_):
        raise AssertionError("an adapter was trained for a bad config")

    monkeypatch.setattr(study, "train_adapter", no_training)
    path = _config(study_folder, old, new)
    with pytest.raises(UserError) as e:
        study.run_study(path, str(tmp_path / "out"))
    for name in names:
        assert name in str(e.value)
    assert "\n" not in str(e.value)
    rc = lab_main(["study", "--config", path, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and names[0] in err


def test_wilson_intervals_match_known_values():
    assert study.wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert study.wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert study.wilson(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    # none or all of 96: the interval ends exactly at 0 or 1 (the figure's error bars need it)
    assert study.wilson(0, 96)[0] == 0.0 and study.wilson(96, 96)[1] == 1.0
    assert study.wilson(81, 100) == pytest.approx((0.72222, 0.87494), abs=1e-4)
    # symmetric: k failures read as n - k successes mirror the interval
    lo, hi = study.wilson(30, 96)
    lo2, hi2 = study.wilson(66, 96)
    assert (lo, hi) == pytest.approx((1 - hi2, 1 - lo2))


def _layer(block, i):
    return f"unet.{block}.transformer_blocks.0.attn1.to_{'qkv'[i]}"


def test_ziplora_merge_lowers_the_overlap_objective():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(16, 2, generator=g) @ torch.randn(2, 24, generator=g)
    content = {_layer("up_blocks.0.attentions.0", i): shared + 0.3 * torch.randn(16, 24, generator=g) for i in range(2)}
    style = {_layer("up_blocks.0.attentions.0", i): shared + 0.3 * torch.randn(16, 24, generator=g) for i in range(2)}
    merged, report = merges.zip_merge(content, style, steps=150, learning_rate=0.05, overlap_weight=0.5)
    assert set(merged) == set(content)
    for name, r in report.items():
        assert r["objective"][1] < 0.8 * r["objective"][0]
        assert r["overlap"][1] < r["overlap"][0]
        # the starting point is the plain sum, whose coefficient vectors are identical
        assert r["overlap"][0] == pytest.approx(1.0)
        m = merged[name]
        assert not torch.allclose(m, content[name] + style[name])


def test_blora_split_only_touches_its_blocks():
    blocks = ["down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
    content = {_layer(b, i): torch.full((4, 4), 1.0 + k) for k, b in enumerate(blocks) for i in range(2)}
    style = {_layer(b, i): torch.full((4, 4), -1.0 - k) for k, b in enumerate(blocks) for i in range(2)}
    out = merges.block_split(content, style, ["up_blocks.0.attentions.0"], ["up_blocks.0.attentions.1"], (1.0, 0.5))
    assert set(out) == {_layer(b, i) for b in blocks[2:] for i in range(2)}
    for i in range(2):
        assert torch.equal(out[_layer(blocks[2], i)], content[_layer(blocks[2], i)])
        assert torch.equal(out[_layer(blocks[3], i)], 0.5 * style[_layer(blocks[3], i)])
    assert merges.block_of(_layer("mid_block.attentions.0", 0)) == "mid_block.attentions.0"


def test_a_block_the_model_lacks_is_refused_before_training(study_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "train_adapter", lambda _: pytest.fail("trained"))
    for block in ("up_blocks.0", "up_blocks.1.attentions.0"):  # not a block name; no attention there
        path = _config(study_folder, "ziplora_steps = 20", f'ziplora_steps = 20\nblora_style_blocks = ["{block}"]')
        with pytest.raises(UserError, match=f"merge.blora_style_blocks entry '{block}'.*up_blocks.0.attentions.1"):
            study.run_study(path, str(tmp_path / "out"))


@pytest.fixture(scope="module")
def interrupted_then_resumed(study_folder):
    """The shrunk study stopped by Ctrl-C during its third adapter, then run again: which
    adapters each run trained, and the second run's report."""
    out = study_folder / "out"
    real = study.train_adapter
    trained = [[], []]

    def first_run(toml_path):
        if len(trained[0]) == 2:
            raise KeyboardInterrupt
        trained[0].append(toml_path)
        real(toml_path)

    def second_run(toml_path):
        trained[1].append(toml_path)
        real(toml_path)

    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(study_folder)  # the output folder given relative to the working directory, as the docs' command does
        mp.setattr(study, "train_adapter", first_run)
        with pytest.raises(KeyboardInterrupt):
            study.run_study(str(study_folder / "study.toml"), "out")
        mp.setattr(study, "train_adapter", second_run)
        report = study.run_study(str(study_folder / "study.toml"), "out")
    finally:
        mp.undo()
    return out, trained, report


def test_an_interrupted_study_resumes_without_training_an_adapter_twice(interrupted_then_resumed, monkeypatch):
    out, (first, second), _ = interrupted_then_resumed
    def names(paths):
        return [p.rsplit("/", 1)[-1].removesuffix(".toml") for p in paths]

    assert names(first) == ["content-qrlora", "content-lora"]
    assert names(second) == ["style-qrlora", "style-lora"]
    # a third run trains nothing
    monkeypatch.setattr(study, "train_adapter", lambda _: pytest.fail("an adapter was trained twice"))
    record = study.train_all(study.load_study(str(out.parent / "study.toml")), str(out))
    assert sorted(record) == ["content-lora", "content-qrlora", "style-lora", "style-qrlora"]


def test_the_shrunk_study_fills_every_cell_of_the_table(interrupted_then_resumed):
    out, _, _ = interrupted_then_resumed
    saved = json.loads((out / "study.json").read_text())
    assert set(saved["results"]) == set(study.METHODS)
    for row in saved["results"].values():
        assert set(row) == set(study.SCORERS)
        for r in row.values():
            assert r["n"] == 4 and 0 <= r["low"] <= r["fraction"] <= r["high"] <= 1
            assert r["fraction"] == r["k"] / r["n"] and len(r["per_seed"]) == 2
    table = (out / "study.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and "%" in line and "[" in line]
    assert len(rows) == len(study.METHODS)
    assert all(line.count("%") == len(study.SCORERS) for line in rows)
    sim = saved["similarity"]
    lengths = {len(v) for v in sim["per_layer"].values()}
    assert lengths == {len(sim["layers"])} and len(sim["layers"]) > 0
    assert all(not math.isnan(x) for v in sim["per_layer"].values() for x in v)
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    z = saved["merges"]["ziplora"]
    assert z["objective"][1] < z["objective"][0]

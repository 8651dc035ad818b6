"""The README demo (``python -m trainer --config examples/demo.toml``): a QR-LoRA of a pattern
the lab base never saw, scored at the end of the run by ``[sampling] scorer``, which prints
one JSON line and writes a before/after grid; and what a wrong scorer setting gets."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from trainer.config import ConfigError, load_config
from trainer.sample_scoring import SHOWN, write_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo.toml")
LAB_BASE = os.path.join(ROOT, "examples", "lab", "lab-base.safetensors")
needs_base = pytest.mark.skipif(not os.path.isfile(LAB_BASE), reason="examples/lab/lab-base.safetensors not built")


@needs_base
def test_the_demo_config_trains_the_striped_concept_on_the_lab_base(tmp_path):
    cfg = load_config(DEMO, [f"training.output_dir={tmp_path}"])
    assert cfg.model.pretrained == LAB_BASE and cfg.sampling.scorer == "lab:striped"
    assert cfg.sampling.sample_at_first and cfg.dataset_plan().datasets[0].subsets[0].image_count == 48


# four of the demo's prompts, 8 sampling steps: a quarter of its samples, at less than half the cost each
SHRUNK_PROMPTS = '["a purple striped circle on white --d 10000 --s 8 --l 1", "a green striped cross on gray --d 10001' \
                 ' --s 8 --l 1", "a red striped triangle on black --d 10002 --s 8 --l 1", "a yellow striped square' \
                 ' on white --d 10012 --s 8 --l 1"]'


@needs_base
def test_a_shrunk_demo_run_prints_the_json_line_and_writes_the_grid(tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainer", "--config", DEMO, "--set", f"training.output_dir={tmp_path}",
                          "--set", "training.max_train_steps=2", "--set", f"sampling.prompts={SHRUNK_PROMPTS}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path),
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))  # as a terminal shows it
    assert out.returncode == 0, out.stdout[-4000:]
    # the run ENDS with the JSON line: nothing after it, not even the progress bar's last refresh
    report = json.loads(out.stdout.strip().replace("\r", "\n").splitlines()[-1])
    for key in ("concept_before", "concept_after", "colour_before", "colour_after", "background_before",
                "background_after", "seconds", "n", "step_after", "grid"):
        assert key in report, key
    assert report["n"] == 4 and report["step_after"] == 2 and report["seconds"] > 0
    assert 0 <= report["concept_before"] <= 1 and 0 <= report["concept_after"] <= 1
    # the last step was not on the sampling schedule (every 500 steps): its samples were made at the end
    samples = os.listdir(tmp_path / "sample")
    assert sum("_first_" in s for s in samples) == sum("_000002_" in s for s in samples) == 4
    grid = Image.open(report["grid"]).convert("RGB")
    assert report["grid"] == str(tmp_path / "demo_striped_before_after.png")
    assert grid.width > 2 * 2 * 96 and grid.height > 2 * 96  # 2 x 2 samples before, 2 x 2 after


def test_the_grid_frames_in_green_exactly_the_samples_showing_the_concept(tmp_path):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        paths.append(str(tmp_path / f"s{i}.png"))
        Image.new("RGB", (32, 32), colour).save(paths[-1])
    write_grid(str(tmp_path / "grid.png"), [paths, paths], [[True, False, False], [True, True, False]],
               ["before", "after"])
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    frames = [grid.getpixel((x + 1, y + 1)) for x, y in _cell_corners(grid.width, 2, 2, 3)]
    assert [f == SHOWN for f in frames] == [True, False, False, True, True, False]


def _cell_corners(width, blocks, per_row, n):
    """Top-left corners of the cells, block by block (the layout write_grid draws)."""
    from trainer import sample_scoring as S

    cell = 32 * S.CELL_SCALE + 2 * S.FRAME
    block_w = (width - (blocks - 1) * 16) // blocks
    return [(b * (block_w + 16) + (i % per_row) * (cell + 2), 20 + (i // per_row) * (cell + 2))
            for b in range(blocks) for i in range(n)]


@pytest.mark.parametrize("overrides, message", [
    (["sampling.scorer=lab:stripy"], "sampling.scorer: 'lab:stripy' is not a scorer; expected one of lab:striped,"),
    (["sampling.scorer=lab:solid"], "sampling.scorer: 'lab:solid' is not a scorer"),  # the base knows it
    (["sampling.scorer=striped"], "did you mean 'lab:striped'?"),
    (["sampling.sample_at_first=false"], "needs sampling.sample_at_first = true"),
    (["sampling.scorer=lab:star"], "sampling.prompts: prompt 1 ('a purple striped circle on white') is not a lab"
                                   " caption with 'star'"),
])
def test_a_wrong_scorer_setting_is_a_config_error_naming_the_field(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [f"training.output_dir={tmp_path}", *overrides], check_paths=False)
    assert any(message in p for p in e.value.problems), e.value.problems


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path, capsys):
    from trainer.cli import main

    assert main(["--config", DEMO, "--set", f"training.output_dir={tmp_path}", "--set", "sampling.scorer=lab:dots"]) == 2
    err = capsys.readouterr().err
    assert "sampling.scorer: 'lab:dots' is not a scorer" in err and "Traceback" not in err

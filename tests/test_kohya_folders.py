"""kohya's dataset without a dataset config: train_data_dir / reg_data_dir of
'<repeats>_<class tokens>' sub-folders (kohya's generate_dreambooth_subsets_config_by_subdirs),
in_json, and an image_dir that points at such a parent folder."""

import os

import pytest
from PIL import Image

from trainer.config import load_config
from trainer.dataset_config import image_counts, plan_summary
from trainer.schema import ConfigError

MAIN = """
[model]
pretrained = "builtin:tiny-sdxl"
[training]
output_dir = "out"
"""


def images(folder, names, size=(64, 48)):
    os.makedirs(folder, exist_ok=True)
    for n in names:
        Image.new("RGB", size, (120, 30, 200)).save(os.path.join(folder, n))


def config(tmp_path, text):
    path = tmp_path / "dog.toml"
    path.write_text(text + MAIN, encoding="utf-8")
    return str(path)


def problems(path):
    with pytest.raises(ConfigError) as e:
        load_config(path).dataset_plan()
    return e.value.problems


def test_train_data_dir_makes_one_subset_per_concept_folder(tmp_path):
    images(str(tmp_path / "img" / "10_sks dog"), ["a.png", "b.png"])
    images(str(tmp_path / "img" / "2_cat_toy"), ["c.png"])
    images(str(tmp_path / "img" / "0_off"), ["o.png"])
    images(str(tmp_path / "img" / "notes"), ["n.png"])
    images(str(tmp_path / "img"), ["loose.png"])
    images(str(tmp_path / "reg" / "1_dog"), ["r1.png", "r2.png"])
    (tmp_path / "img" / "10_sks dog" / "a.txt").write_text("a photo of sks dog on grass\n")
    cfg = load_config(config(tmp_path, 'train_data_dir = "img"\nreg_data_dir = "reg"\n'
                                       '[general]\nresolution = 64\ncaption_extension = ".txt"\n'))
    plan = cfg.dataset_plan()
    (spec,) = plan.datasets
    got = [(s.source, s.num_repeats, s.class_tokens, s.is_reg, s.image_count) for s in spec.subsets]
    assert got == [("train_data_dir/10_sks dog", 10, "sks dog", False, 2),
                   ("train_data_dir/2_cat_toy", 2, "cat_toy", False, 1),  # underscores after the first kept
                   ("reg_data_dir/1_dog", 1, "dog", True, 2)]
    captions = {os.path.basename(i.path): (i.caption, i.repeats) for i in spec.items}
    assert captions == {"a.png": ("a photo of sks dog on grass", 10), "b.png": ("sks dog", 10),
                        "c.png": ("cat_toy", 2), "r1.png": ("dog", 1), "r2.png": ("dog", 1)}
    assert spec.buckets.resolution == (64, 64)  # dataset options come from [general]
    w = "\n".join(plan.warnings)
    assert "sub-folder 'notes' is skipped: its name does not start with '<repeats>_'" in w
    assert "sub-folder '0_off' has 0 repeats, so it is skipped" in w
    assert "1 images directly in" in w and "kohya reads only its '<repeats>_<class tokens>' sub-folders" in w


def test_folder_keys_conflicts_and_missing_folders(tmp_path):
    images(str(tmp_path / "img" / "5_x"), ["a.png"])
    (tmp_path / "ds.toml").write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'img/5_x'\n")
    both = problems(config(tmp_path, 'train_data_dir = "img"\ndataset_config = "ds.toml"\n'))
    assert both == ["train_data_dir and dataset_config are both given; use one (kohya would ignore train_data_dir)"]
    inline = problems(config(tmp_path, 'train_data_dir = "img"\n[[datasets]]\nresolution = 64\n'
                                       '[[datasets.subsets]]\nimage_dir = "img/5_x"\n'))
    assert inline[0].startswith("train_data_dir and [[datasets]] tables are both given; use one")
    missing = problems(config(tmp_path, 'train_data_dir = "nothere"\n[general]\nresolution = 64\n'))
    assert missing == [f"train_data_dir: {tmp_path / 'nothere'} does not exist"]
    empty = tmp_path / "flat"
    images(str(empty), ["a.png"])
    flat = problems(config(tmp_path, 'train_data_dir = "flat"\n[general]\nresolution = 64\n'))
    assert flat == [f"train_data_dir: {empty} has no '<repeats>_<class tokens>' sub-folder (e.g. '10_sks dog'"
                    " for 10 repeats of its images with the class tokens 'sks dog')"]
    assert problems(config(tmp_path, 'reg_data_dir = "img"\n[general]\nresolution = 64\n'))[0].startswith(
        "reg_data_dir needs train_data_dir")
    no_res = problems(config(tmp_path, 'train_data_dir = "img"\n'))
    assert no_res == ["train_data_dir.resolution is required: set it in [general]"]


def test_folder_keys_belong_at_the_top_level(tmp_path):
    images(str(tmp_path / "img" / "5_x"), ["a.png"])
    msg = problems(config(tmp_path, '[general]\nresolution = 64\n[sampling]\ntrain_data_dir = "img"\n'))
    assert "sampling.train_data_dir: is a top-level key: write it before the first [section] of the config" in msg


def test_in_json_is_kohya_fine_tuning_with_train_data_dir_as_image_dir(tmp_path):
    images(str(tmp_path / "pics"), ["a.png", "b.png"])
    (tmp_path / "meta.json").write_text('{"a.png": {"caption": "one"}, "b.png": {"tags": "x, y"}}')
    cfg = load_config(config(tmp_path, 'train_data_dir = "pics"\nin_json = "meta.json"\n[general]\nresolution = 64\n'))
    (spec,) = cfg.dataset_plan().datasets
    assert spec.kind == "finetuning" and [s.source for s in spec.subsets] == ["in_json"]
    assert sorted(i.caption for i in spec.items) == ["one", "x, y"]
    images(str(tmp_path / "reg" / "1_r"), ["r.png"])
    both = problems(config(tmp_path, 'train_data_dir = "pics"\nin_json = "meta.json"\nreg_data_dir = "reg"\n'
                                     '[general]\nresolution = 64\n'))
    assert both[0].startswith("reg_data_dir: regularization folders only apply to train_data_dir's concept folders")


def test_image_dir_at_a_concept_parent_says_what_it_found_and_what_to_write(tmp_path):
    images(str(tmp_path / "train" / "10_sks dog"), ["a.png", "b.png", "c.png"])
    (msg,) = problems(config(tmp_path, '[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "train"\n'))
    parent, concept = tmp_path / "train", tmp_path / "train" / "10_sks dog"
    assert msg.startswith(f"datasets[0].subsets[0].image_dir: {parent} holds no images itself but kohya concept"
                          " folders '10_sks dog' (3 images: num_repeats 10, class_tokens 'sks dog')")
    assert f"Write train_data_dir = '{parent}' at the top of the training config" in msg
    assert f"(image_dir = '{concept}', num_repeats = 10, class_tokens = 'sks dog')" in msg


def test_summary_says_which_counts_include_repeats(tmp_path):
    images(str(tmp_path / "img" / "10_sks dog"), ["a.png", "b.png"])
    images(str(tmp_path / "reg" / "1_dog"), ["r1.png", "r2.png", "r3.png"])
    cfg = load_config(config(tmp_path, 'train_data_dir = "img"\nreg_data_dir = "reg"\n[general]\nresolution = 64\n'))
    plan = cfg.dataset_plan()
    text = "2 train images (20 with repeats) + 3 reg images (3 with repeats, 20 used per epoch)"
    assert image_counts(plan) == text and plan_summary(plan)["images"] == text
    from trainer.cli import dry_run, format_dry_run

    out = format_dry_run(dry_run(cfg))
    assert f"  images: {text}" in out and "  buckets (images with repeats): " in out

"""Where the trainer deliberately differs from kohya (docs/kohya.md), each case prints what
happens here and what kohya does; and the config reference covers every option."""

import json
import os

import pytest
from PIL import Image

from trainer import buckets as bk
from trainer.config import SECTIONS, SOURCES, MetadataConfig, reference
from trainer.dataset_config import GENERAL, SUBSET, load_dataset_config
from trainer.plan import BucketOptions
from trainer.schema import schema_of


def images(folder, names, size=(64, 48)):
    os.makedirs(folder, exist_ok=True)
    for n in names:
        Image.new("RGB", size, (120, 30, 200)).save(os.path.join(folder, n))


def plan_from(tmp_path, text):
    path = tmp_path / "dataset.toml"
    path.write_text("[general]\nresolution = 64\n" + text, encoding="utf-8")
    return load_dataset_config(str(path))


def test_metadata_keys_listed_twice_keep_the_last_entry_with_a_warning(tmp_path):
    images(str(tmp_path / "img"), ["a.png", "b.png"])
    (tmp_path / "md.json").write_text('{"a.png": {"caption": "old"}, "b.png": {"caption": "b"},'
                                      ' "a.png": {"caption": "new"}}')
    (tmp_path / "md.jsonl").write_text('{"image_path": "a.png", "caption": "first"}\n'
                                       '{"image_path": "a.png", "caption": "second"}\n'
                                       '{"image_path": "b.png", "caption": "b"}\n'
                                       '{"image_path": "a.png", "caption": "third"}\n')
    for name, caption, where in (("md.json", "new", "'a.png' 2 times"),
                                 ("md.jsonl", "third", "'a.png' 3 times (lines 1, 2, 4)")):
        plan = plan_from(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{name}'\nimage_dir = 'img'\n")
        items = {os.path.basename(i.path): i.caption for i in plan.datasets[0].items}
        assert items == {"a.png": caption, "b.png": "b"}
        (w,) = [w for w in plan.warnings if "more than once" in w]
        assert f"1 image keys are listed more than once ({where}); each is trained once with its last entry's" in w
        assert "(kohya does the same without a warning)" in w


def test_one_image_named_by_two_metadata_keys_is_trained_once(tmp_path):
    images(str(tmp_path / "img"), ["a.png", "b.png"])
    (tmp_path / "md.json").write_text(json.dumps({"a.png": {"caption": "x"}, "./a.png": {"caption": "y"},
                                                  "b": {"caption": "b"}}))
    plan = plan_from(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'md.json'\nimage_dir = 'img'\n")
    assert sorted((os.path.basename(i.path), i.caption) for i in plan.datasets[0].items) == [("a.png", "y"),
                                                                                           ("b.png", "b")]
    assert any("1 images are named by more than one key in md.json ('a.png' and './a.png'); each is trained once"
               " with its last entry; kohya would train it once per key" in w for w in plan.warnings)


@pytest.mark.parametrize("first, later, kohya", [
    ("imgs", "imgs", "(kohya skips it too)"),
    ("imgs", "./imgs", "kohya compares the paths as written, so it would keep both subsets and train each image"
                       " twice (once per subset, with each subset's num_repeats)"),
    ("imgs", "imgs/", "their images get the same paths, so it trains each once with the later subset's options"),
])
def test_one_folder_in_two_subsets_says_what_kohya_does(tmp_path, first, later, kohya):
    images(str(tmp_path / "imgs"), ["a.png"])
    plan = plan_from(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{first}'\nnum_repeats = 2\n"
                               f"[[datasets.subsets]]\nimage_dir = '{later}'\nnum_repeats = 3\n")
    assert [i.repeats for i in plan.datasets[0].items] == [2]
    (w,) = [w for w in plan.warnings if "same image_dir" in w]
    assert w.startswith("datasets[0].subsets[1]: same image_dir as datasets[0].subsets[0] in the same dataset, so"
                        " this subset is skipped")
    assert kohya in w


def test_image_smaller_than_a_bucket_step_under_no_upscale_says_what_kohya_does():
    opts = BucketOptions((64, 64), True, 64, 128, 64, True)
    with pytest.raises(bk.ImageTooSmall) as e:
        bk.select_bucket((100, 40), opts, [])
    assert "bucket_no_upscale never enlarges an image" in str(e.value)
    assert "kohya does not check this: it stops with a ZeroDivisionError" in str(e.value)


def _all_schemas():
    yield "top level", SOURCES
    for name, cls in SECTIONS.items():
        yield f"[{name}]", schema_of(cls)
    yield "[saving.metadata]", schema_of(MetadataConfig)
    yield "[general]", GENERAL
    for kind, schema in SUBSET.items():
        yield f"[[datasets.subsets]] {kind}", schema


def test_every_config_key_has_a_description():
    missing = [f"{where} {f.name}" for where, schema in _all_schemas() for f in schema.fields.values() if not f.help]
    assert missing == []


def test_help_config_prints_every_section_and_key(capsys):
    from trainer.cli import main

    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    assert out == reference()
    for where, schema in _all_schemas():
        for f in schema.fields.values():
            assert f"| `{f.name}` | {f.type.expected} |" in out, (where, f.name)
    for section in list(SECTIONS) + ["saving.metadata", "general"]:
        assert f"### [{section}]" in out
    assert "| `rank` | an integer >= 1 | 16 | `network_dim` |" in out
    assert "| `train_data_dir` | a path (a non-empty string) |  | `train_data_dir` |" in out
    assert "| `num_repeats` | an integer | 1 | `num_repeats` |" in out

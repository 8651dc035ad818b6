"""kohya's dataset TOML → DatasetPlan: the examples from kohya's docs, inheritance, kinds,
captions, metadata files, and the problems kohya reports (or silently accepts)."""

import json
import os

import pytest
from PIL import Image

from trainer.dataset_config import (
    build_plan, effective_repeats, load_dataset_config, plan_summary, resolve, resolve_file,
)
from trainer.schema import ConfigError, Context


def images(folder, names, size=(64, 48)):
    os.makedirs(folder, exist_ok=True)
    for n in names:
        Image.new("RGB", size, (120, 30, 200)).save(os.path.join(folder, n))
    return folder


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def plan_from(tmp_path, toml_text, **kw):
    return load_dataset_config(write(str(tmp_path / "dataset.toml"), toml_text), **kw)


def errors_of(tmp_path, toml_text):
    with pytest.raises(ConfigError) as e:
        plan_from(tmp_path, toml_text)
    return e.value.problems


def by_subset(spec):
    return {s.source: [i for i in spec.items if i.subset == k] for k, s in enumerate(spec.subsets)}


# The first example of kohya's docs/config_README-en.md, with its Windows folders replaced.
README_EXAMPLE = r"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'C:\hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = 'C:\fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'C:\piyo'
  metadata_file = 'C:\piyo\piyo_md.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""


def test_readme_example(tmp_path):
    hoge = images(str(tmp_path / "hoge"), ["h0.png", "h1.jpg", "h2.webp"])
    write(os.path.join(hoge, "h0.txt"), "1girl, hoge\nsecond line ignored\n")
    images(str(tmp_path / "fuga"), ["f0.png", "f1.png"])
    images(str(tmp_path / "reg"), ["r0.png", "r1.png", "r2.png", "r3.png"])
    piyo = images(str(tmp_path / "piyo"), ["p0.png", "p1.png", "p2.png"])
    write(os.path.join(piyo, "piyo_md.json"), json.dumps({
        "p0.png": {"caption": "a frog", "tags": "green, frog"},
        "p1.png": {"caption": "a toad", "image_size": [640, 480]},
        "p2": {"tags": "no caption"},  # a stem key, as kohya's merge scripts write by default
    }))
    text = README_EXAMPLE.replace("C:\\", str(tmp_path) + "/").replace("piyo\\", "piyo/")
    plan = plan_from(tmp_path, text)

    db, ft = plan.datasets
    assert (db.kind, db.batch_size, db.buckets.resolution) == ("dreambooth", 4, (512, 512))
    assert (ft.kind, ft.batch_size, ft.buckets.resolution) == ("finetuning", 2, (768, 768))
    subsets = by_subset(db)
    hoge_items = subsets["datasets[0].subsets[0]"]
    assert [os.path.basename(i.path) for i in hoge_items] == ["h0.png", "h1.jpg", "h2.webp"]
    assert [i.caption for i in hoge_items] == ["1girl, hoge", "hoge girl", "hoge girl"]  # first line; class_tokens
    # keep_tokens: dataset 2 → hoge; subset 3 → fuga; subset 1 → reg; [general] 1 → piyo
    keep = {src: {i.captions.keep_tokens for i in items} for src, items in subsets.items()}
    assert keep == {"datasets[0].subsets[0]": {2}, "datasets[0].subsets[1]": {3}, "datasets[0].subsets[2]": {1}}
    assert {i.captions.keep_tokens for i in ft.items} == {1}
    assert all(i.captions.shuffle_caption for d in plan.datasets for i in d.items)
    assert [i.is_reg for i in subsets["datasets[0].subsets[2]"]] == [True] * 4
    assert {i.repeats for d in plan.datasets for i in d.items} == {1}

    captions = {os.path.basename(i.path): (i.caption, i.size) for i in ft.items}
    assert captions == {"p0.png": ("a frog,green, frog", None), "p1.png": ("a toad", (640, 480)),
                        "p2.png": ("no caption", None)}

    s = plan_summary(plan)
    d0, d1 = s["datasets"]
    assert [(x["images"], x["num_repeats"], x["is_reg"]) for x in d0["subsets"]] == [(3, 1, False), (2, 1, False),
                                                                                   (4, 1, True)]
    assert (d0["train_images"], d0["train_images_x_repeats"], d0["reg_images"]) == (5, 5, 4)
    # kohya balances reg images to the train count: 4 reg images, one of them shown twice
    assert d0["subsets"][2]["used_per_epoch"] == 5 and d0["samples_per_epoch"] == 10
    assert (d1["train_images"], d1["samples_per_epoch"]) == (3, 3)
    assert s["total"]["train_images"] == 8
    json.dumps(s)


def test_readme_duplicate_subsets(tmp_path):
    """The docs' duplicate-subsets example: one folder in two datasets is used twice; inside
    one dataset kohya drops the later duplicate."""
    images(str(tmp_path / "hoge"), ["a.png", "b.png"])
    plan = plan_from(tmp_path, """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = 'hoge'

[[datasets]]
resolution = 768
  [[datasets.subsets]]
  image_dir = 'hoge'
  [[datasets.subsets]]
  image_dir = 'hoge'
  num_repeats = 5
""")
    assert [len(d.items) for d in plan.datasets] == [2, 2]
    assert [d.buckets.resolution for d in plan.datasets] == [(512, 512), (768, 768)]
    assert plan.datasets[1].subsets[1].skipped == "duplicate of datasets[1].subsets[0]"
    assert {i.repeats for i in plan.datasets[1].items} == {1}
    assert any("so this subset is skipped (kohya skips it too)" in w for w in plan.warnings)


def test_readme_separator_example(tmp_path):
    """docs' secondary_separator / wildcard / keep_tokens_separator example."""
    d = images(str(tmp_path / "image_dir"), ["a.png"])
    write(os.path.join(d, "a.txt"), "1girl, sky;;;cloud, outdoors")
    plan = plan_from(tmp_path, """
[general]
flip_aug = true
color_aug = false
resolution = [1024, 1024]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
caption_extension = ".txt"
keep_tokens_separator= "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;" # subset 側に書くこともできます / can be written in the subset side
enable_wildcard = true # 同上 / same as above

  [[datasets.subsets]]
  image_dir = "image_dir"
  num_repeats = 1
  caption_prefix = "1girl, hatsune miku, vocaloid |||"
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
""")
    spec = plan.datasets[0]
    assert (spec.batch_size, spec.buckets.enable_bucket, spec.buckets.bucket_no_upscale) == (6, True, True)
    assert spec.buckets.resolution == (1024, 1024)
    item = spec.items[0]
    assert item.caption == "1girl, sky;;;cloud, outdoors"
    c = item.captions
    assert (c.keep_tokens_separator, c.shuffle_caption, c.caption_tag_dropout_rate) == ("|||", True, 0.1)
    assert c.caption_prefix == "1girl, hatsune miku, vocaloid |||" and c.caption_suffix.startswith(", anime")
    assert item.augment.flip_aug
    unsupported = [w for w in plan.warnings if "not implemented" in w]
    assert any(w.startswith("secondary_separator") for w in unsupported)
    assert any(w.startswith("enable_wildcard") for w in unsupported)
    assert not any(w.startswith("color_aug") for w in unsupported)  # false is kohya's default


def test_flux_doc_multires_example(tmp_path):
    images(str(tmp_path / "imgs"), ["a.png", "b.png"])
    plan = plan_from(tmp_path, """
[general]
flip_aug = true
color_aug = false
keep_tokens_separator= "|||"
shuffle_caption = false
caption_tag_dropout_rate = 0
caption_extension = ".txt"

[[datasets]]
batch_size = 2
enable_bucket = true
resolution = [1024, 1024]
  [[datasets.subsets]]
  image_dir = "imgs"
  num_repeats = 1

[[datasets]]
batch_size = 3
enable_bucket = true
resolution = [768, 768]
  [[datasets.subsets]]
  image_dir = "imgs"
  num_repeats = 1
""")
    assert [(d.batch_size, d.buckets.resolution, len(d.items)) for d in plan.datasets] == [
        (2, (1024, 1024), 2), (3, (768, 768), 2)]


def test_doc_examples_kohya_rejects_are_rejected(tmp_path):
    """kohya's own docs show keys its schema rejects (reference §1.5); so do we."""
    images(str(tmp_path / "imgs"), ["a.png"])
    problems = errors_of(tmp_path, """
validation_seed = 42
[[datasets]]
resolution = [1024, 1024]
interpolation_type = "lanczos"
  [[datasets.subsets]]
  image_dir = "imgs"
  validation_split = 0.1
""")
    text = "\n".join(problems)
    assert "unknown key 'validation_seed' at the top level" in text
    assert "unknown key 'interpolation_type' in datasets[0]" in text
    assert "datasets[0].subsets[0].validation_split: is a dataset option" in text


def test_kohya_verified_errors_all_at_once(tmp_path):
    problems = errors_of(tmp_path, """
[general]
is_reg = true
[[datasets]]
resolution = "1024,1024"
  [[datasets.subsets]]
  num_repeats = 2.5
  batch_size = 2
  [[datasets.subsets]]
  image_dir = "x"
  num_repeat = 3
  flip_aug = 1
""")
    assert problems == [
        "general.is_reg: can only be set in a [[datasets.subsets]] entry",
        "datasets[0].resolution: expected an integer or [width, height], got '1024,1024'",
        "datasets[0].subsets[0].num_repeats: expected an integer, got 2.5",
        "datasets[0].subsets[0].batch_size: is a dataset option: set it in [[datasets]] or [general], not in a subset",
        "datasets[0].subsets[0].image_dir is required",
        "unknown key 'num_repeat' in datasets[0].subsets[1]; did you mean 'num_repeats'?",
        "datasets[0].subsets[1].flip_aug: expected true or false, got 1",
    ]


def test_inheritance_subset_dataset_general_default(tmp_path):
    for name in "abc":
        d = images(str(tmp_path / name), ["x.png"])
        write(os.path.join(d, "x.txt"), f"txt {name}")
        write(os.path.join(d, "x.cap"), f"cap {name}")
    plan = plan_from(tmp_path, """
[general]
resolution = 256
num_repeats = 7
caption_extension = ".cap"
flip_aug = true
class_tokens = "general class"
[[datasets]]
num_repeats = 3
caption_extension = ".txt"
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  image_dir = "b"
  num_repeats = 2
  caption_extension = "cap"
  flip_aug = false
[[datasets]]
batch_size = 5
  [[datasets.subsets]]
  image_dir = "c"
""")
    (a,), (b,) = by_subset(plan.datasets[0]).values()
    (c,) = plan.datasets[1].items
    assert (a.repeats, a.caption, a.augment.flip_aug) == (3, "txt a", True)
    assert (b.repeats, b.caption, b.augment.flip_aug) == (2, "cap b", False)  # "cap" gets its dot, as in kohya
    assert (c.repeats, c.caption, c.augment.flip_aug, c.captions.keep_tokens) == (7, "cap c", True, 0)
    assert plan.datasets[1].buckets.resolution == (256, 256) and plan.datasets[1].batch_size == 5
    assert plan.datasets[0].batch_size == 1 and plan.datasets[0].buckets.min_bucket_reso == 256


def test_mixed_kinds_rejected(tmp_path):
    problems = errors_of(tmp_path, """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  metadata_file = "m.json"
  [[datasets.subsets]]
  image_dir = "b"
""")
    assert any("DreamBooth subsets (subsets[0], subsets[2]: no metadata_file) and fine-tuning subsets"
               " (subsets[1]: metadata_file) cannot be mixed" in p for p in problems)


def test_finetuning_rejects_dreambooth_keys(tmp_path):
    problems = errors_of(tmp_path, """
[general]
class_tokens = "fine in general"
[[datasets]]
resolution = 512
caption_extension = ".txt"
  [[datasets.subsets]]
  metadata_file = "m.json"
  is_reg = true
""")
    assert problems == [
        "datasets[0].caption_extension: only applies to DreamBooth subsets; this dataset is fine-tuning"
        " (its subsets have metadata_file)",
        "datasets[0].subsets[0].is_reg: only applies to DreamBooth subsets; this dataset is fine-tuning"
        " (its subsets have metadata_file)",
    ]


def test_caption_extension_warning_and_class_tokens(tmp_path):
    d = images(str(tmp_path / "dog"), ["1.png", "2.PNG", "3.Jpg", "4.gif"])
    for n in "123":
        write(os.path.join(d, f"{n}.txt"), f"caption {n}")
    images(str(tmp_path / "dog" / "nested"), ["deep.png"])  # not recursive, like kohya
    plan = plan_from(tmp_path, """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "dog"
  class_tokens = "sks dog"
""")
    items = plan.datasets[0].items
    assert [os.path.basename(i.path) for i in items] == ["1.png", "2.PNG", "3.Jpg"]
    assert {i.caption for i in items} == {"sks dog"}  # kohya's default extension is .caption
    (w,) = plan.warnings
    assert "3 of 3 images have a .txt caption file that is ignored because caption_extension is '.caption'" in w
    assert "kohya's default" in w and "class_tokens 'sks dog'" in w and "caption_extension = '.txt'" in w


def test_no_caption_no_class_tokens(tmp_path):
    d = images(str(tmp_path / "x"), ["a.png", "b.png"])
    write(os.path.join(d, "a.caption"), "a cat")
    plan = plan_from(tmp_path, "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'x'\n")
    assert [i.caption for i in plan.datasets[0].items] == ["a cat", ""]
    assert any("1 of 2 images have no .caption file and the subset has no class_tokens" in w for w in plan.warnings)


def test_caption_file_edge_cases(tmp_path):
    d = images(str(tmp_path / "x"), ["a.png", "b.png", "face_1_2_3_4.png"])
    write(os.path.join(d, "a.caption"), "\n")  # blank: kohya uses "", not class_tokens
    write(os.path.join(d, "face.caption"), "a face")  # kohya's face-crop caption fallback
    write(os.path.join(d, "b.caption"), "")  # empty: kohya asserts
    toml = "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'x'\nclass_tokens = 'ct'\n"
    problems = errors_of(tmp_path, toml)
    assert problems == [f"caption file is empty: {os.path.join(d, 'b.caption')}"]
    write(os.path.join(d, "b.caption"), "b\n")
    plan = plan_from(tmp_path, toml)
    assert [i.caption for i in plan.datasets[0].items] == ["", "b", "a face"]
    assert any("1 caption files are blank" in w for w in plan.warnings)


def test_finetuning_json_and_jsonl(tmp_path):
    d = images(str(tmp_path / "ft"), ["a.png", "b.jpg", "c.png"])
    write(str(tmp_path / "md.jsonl"), "\n".join([
        json.dumps({"image_path": "a.png", "caption": "an apple", "image_size": [64, 48]}),
        json.dumps({"image_path": os.path.join(d, "b.jpg"), "tags": "red, fruit"}),
        "",
        json.dumps({"image_path": "c.png", "caption": "a cherry", "tags": "red"}),
    ]) + "\n")
    write(str(tmp_path / "abs.json"), json.dumps({os.path.join(d, "c.png"): {"caption": "abs"}}))
    plan = plan_from(tmp_path, """
[general]
caption_separator = "; "
[[datasets]]
resolution = 512
num_repeats = 4
  [[datasets.subsets]]
  image_dir = "ft"
  metadata_file = "md.jsonl"
  [[datasets.subsets]]
  metadata_file = "abs.json"   # absolute keys need no image_dir
  num_repeats = 2
""")
    spec = plan.datasets[0]
    got = [(os.path.basename(i.path), i.caption, i.size, i.repeats, i.is_reg) for i in spec.items]
    assert got == [("a.png", "an apple", (64, 48), 4, False), ("b.jpg", "red, fruit", None, 4, False),
                   ("c.png", "a cherry; red", None, 4, False), ("c.png", "abs", None, 2, False)]
    assert plan_summary(plan)["datasets"][0]["train_images_x_repeats"] == 14


def test_missing_images_reported_at_once(tmp_path):
    images(str(tmp_path / "ft"), ["a.png"])
    write(str(tmp_path / "md.json"), json.dumps({k: {"caption": k} for k in ["a.png", "gone1.png", "gone2", "x/y.png"]}))
    write(str(tmp_path / "rel.json"), json.dumps({"r.png": {"caption": "r"}}))
    problems = errors_of(tmp_path, """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "ft"
  metadata_file = "md.json"
  [[datasets.subsets]]
  metadata_file = "rel.json"
  [[datasets.subsets]]
  metadata_file = "nope.json"
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "no_such_dir"
""")
    assert len(problems) == 4
    assert "datasets[0].subsets[0]: 3 of 4 images listed in md.json were not found in" in problems[0]
    assert "gone1.png, gone2, y.png" in problems[0]
    assert "1 keys in rel.json are relative paths (r.png), so the subset needs image_dir" in problems[1]
    assert problems[2].startswith("datasets[0].subsets[2].metadata_file:") and "does not exist" in problems[2]
    assert problems[3].startswith("datasets[1].subsets[0].image_dir:") and "does not exist" in problems[3]


def test_empty_subsets_reg_only_and_zero_repeats(tmp_path):
    images(str(tmp_path / "train" / "sks dog"), ["a.png"])  # images one level too deep (not a kohya concept folder)
    images(str(tmp_path / "reg"), ["r.png"])
    images(str(tmp_path / "off"), ["o.png"])
    images(str(tmp_path / "ok"), ["k.png"])
    plan = plan_from(tmp_path, """
[general]
resolution = 512
[[datasets]]
  [[datasets.subsets]]
  image_dir = "train"
  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
[[datasets]]
  [[datasets.subsets]]
  image_dir = "off"
  num_repeats = 0
  [[datasets.subsets]]
  image_dir = "ok"
""")
    w = "\n".join(plan.warnings)
    assert "datasets[0].subsets[0]: no images in" in w and "sub-folders (sks dog) hold images" in w
    assert "datasets[0]: regularization images but no training images" in w
    assert "datasets[1].subsets[0]: num_repeats is 0, so kohya ignores this subset" in w
    assert [s.skipped for s in plan.datasets[0].subsets] == ["no images", ""]
    assert effective_repeats(plan.datasets[0]) == [0]  # kohya uses no reg images without train images
    assert [len(d.items) for d in plan.datasets] == [1, 1]


def test_no_training_images_is_an_error(tmp_path):
    images(str(tmp_path / "reg"), ["r.png"])
    problems = errors_of(tmp_path, "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'reg'\n"
                                   "is_reg = true\n")
    assert problems == ["no training images found in any subset"]


def test_reg_balancing_like_kohya(tmp_path):
    images(str(tmp_path / "t"), ["t0.png", "t1.png"])
    images(str(tmp_path / "r"), [f"r{i}.png" for i in range(5)])
    plan = plan_from(tmp_path, """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "t"
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = "r"
  is_reg = true
  num_repeats = 2
""")
    # 6 train samples; reg taken in order with 2 repeats until 6 are reached: r0, r1, r2
    assert effective_repeats(plan.datasets[0]) == [3, 3, 2, 2, 2, 0, 0]
    assert any("reg images × repeats for 6 train" in w for w in plan.warnings)


def test_resolution_and_buckets(tmp_path):
    images(str(tmp_path / "x"), ["a.png"])
    problems = errors_of(tmp_path, """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "x"
[[datasets]]
resolution = [1024, 768]
enable_bucket = true
max_bucket_reso = 900
  [[datasets.subsets]]
  image_dir = "x"
""")
    assert problems == [
        "datasets[0].resolution is required: set it in this [[datasets]] entry or in [general]",
        "datasets[1]: resolution 1024x768 must lie within min_bucket_reso 256 and max_bucket_reso 960",
    ]
    plan = plan_from(tmp_path, """
[[datasets]]
resolution = [1024, 768]
enable_bucket = true
min_bucket_reso = 300
max_bucket_reso = 1100
  [[datasets.subsets]]
  image_dir = "x"
""")
    b = plan.datasets[0].buckets
    assert (b.resolution, b.min_bucket_reso, b.max_bucket_reso) == ((1024, 768), 256, 1152)
    assert any("rounded down to 256" in w for w in plan.warnings)


def test_validation_split_refused(tmp_path):
    problems = errors_of(tmp_path, "[[datasets]]\nresolution = 512\nvalidation_split = 0.1\n"
                                   "[[datasets.subsets]]\nimage_dir = 'x'\n")
    assert len(problems) == 1 and problems[0].startswith("datasets[0].validation_split: validation splits")


def test_json_dataset_file_and_training_args_hint(tmp_path):
    images(str(tmp_path / "x"), ["a.png"])
    path = write(str(tmp_path / "ds.json"), json.dumps(
        {"general": {"resolution": [512, 512]}, "datasets": [{"subsets": [{"image_dir": "x"}]}]}))
    assert len(load_dataset_config(path).datasets[0].items) == 1
    problems = errors_of(tmp_path, 'pretrained_model_name_or_path = "m.safetensors"\n'
                                   "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'x'\n")
    assert "looks like a kohya training-arguments file" in problems[0]


def test_resolve_needs_no_disk(tmp_path):
    ctx = Context([], base_dir=str(tmp_path))
    cfg = resolve({"general": {"resolution": 64}, "datasets": [{"subsets": [{"image_dir": "nowhere"}]}]}, ctx)
    assert ctx.errors == []
    assert cfg.datasets[0].subsets[0].options["image_dir"] == str(tmp_path / "nowhere")
    with pytest.raises(ConfigError):
        build_plan(cfg)
    with pytest.raises(ConfigError) as e:
        resolve_file(write(str(tmp_path / "bad.toml"), "[[datasets]\n"))
    assert "line 1" in str(e.value)

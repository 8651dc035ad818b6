"""Caption processing against kohya's rules.

kohya-ss/sd-scripts v0.10.1 (48d368fa) ``library/train_util.py``: ``BaseDataset.process_caption``
(prefix/suffix, dropout, keep_tokens, keep_tokens_separator, shuffle, tag dropout, ", " join)
and ``BaseDataset.set_tag_frequency`` (ss_tag_frequency).
"""

import random
from dataclasses import replace

from trainer.captions import is_deterministic, process_caption, tag_frequency
from trainer.plan import BucketOptions, CaptionOptions, DatasetPlan, DatasetSpec, ImageItem, SubsetInfo

CAP = "sks dog, sitting, grass, sunny day, red collar"


def run(caption, epoch=1, seed=0, **kw):
    return process_caption(caption, CaptionOptions(**kw), epoch, random.Random(seed))


def test_plain_caption_untouched():
    assert run(CAP) == CAP


def test_prefix_suffix_joined_with_a_space():
    assert run("a, b", caption_prefix="photo of", caption_suffix="4k") == "photo of a, b 4k"


def test_prefix_joins_first_tag_for_keep_tokens():
    # kohya adds the prefix before splitting: "sks, " + caption makes "sks" the first tag.
    for seed in range(20):
        out = run("a, b, c", seed=seed, caption_prefix="sks,", keep_tokens=1, shuffle_caption=True)
        assert out.split(", ")[0] == "sks"


def test_shuffle_keeps_leading_tokens_and_multiset():
    outs = set()
    for seed in range(50):
        out = run(CAP, seed=seed, shuffle_caption=True, keep_tokens=2)
        tags = out.split(", ")
        assert tags[:2] == ["sks dog", "sitting"]
        assert sorted(tags) == sorted(CAP.split(", "))
        outs.add(out)
    assert len(outs) > 1


def test_keep_tokens_separator_fixed_head_and_tail():
    cap = "sks, dog ||| grass, sun, tree ||| masterpiece"
    for seed in range(30):
        tags = run(cap, seed=seed, shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5).split(", ")
        assert tags[:2] == ["sks", "dog"]  # the separator wins over keep_tokens
        assert tags[-1] == "masterpiece"
        assert sorted(tags[2:-1]) == ["grass", "sun", "tree"]


def test_separator_left_verbatim_without_shuffle_or_tag_dropout():
    # kohya only splits in the shuffle/tag-dropout branch; otherwise the caption is used as is.
    cap = "sks ||| grass"
    assert run(cap, keep_tokens_separator="|||") == cap


def test_tag_dropout_never_drops_kept_tokens():
    assert run(CAP, keep_tokens=1, caption_tag_dropout_rate=1.0) == "sks dog"
    assert run("x, y ||| a, b ||| z", keep_tokens_separator="|||", caption_tag_dropout_rate=1.0) == "x, y, z"
    dropped = [run(CAP, seed=s, keep_tokens=1, caption_tag_dropout_rate=0.5) for s in range(40)]
    assert all(d.startswith("sks dog") for d in dropped)
    assert len({len(d.split(", ")) for d in dropped}) > 1


def test_caption_dropout_rate_and_every_n_epochs():
    assert run(CAP, caption_dropout_rate=1.0) == ""
    assert run(CAP, caption_dropout_rate=0.0) == CAP
    # kohya: current_epoch % n == 0, with 1-based epochs -> epochs 2, 4 drop, 1, 3 do not.
    assert [run(CAP, epoch=e, caption_dropout_every_n_epochs=2) == "" for e in (1, 2, 3, 4)] == [False, True, False, True]
    rates = sum(run(CAP, seed=s, caption_dropout_rate=0.3) == "" for s in range(400)) / 400
    assert 0.2 < rates < 0.4


def test_custom_separator_split_but_joined_with_comma_space():
    out = run("a; b; c", seed=3, shuffle_caption=True, caption_separator=";")
    assert sorted(out.split(", ")) == ["a", "b", "c"]


def test_first_line_only_and_empty_tags_kept_like_kohya():
    assert run("line one, x\nline two") == "line one, x"
    # kohya's keep_tokens branch strips tags but keeps empty ones (a trailing comma).
    out = run("a, b,", shuffle_caption=True)
    assert sorted(out.split(", ")) == ["", "a", "b"]


def test_same_draw_order_as_kohya():
    # kohya: random.random() for caption dropout (only when its rate > 0), random.shuffle(flex),
    # then one random.random() per flex tag for tag dropout, all from one RNG.
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.1, caption_tag_dropout_rate=0.3)
    for seed in range(30):
        ref = random.Random(seed)
        tags = CAP.split(", ")
        if ref.random() < 0.1:
            expected = ""
        else:
            flex = tags[1:]
            ref.shuffle(flex)
            expected = ", ".join(tags[:1] + [t for t in flex if ref.random() >= 0.3])
        assert process_caption(CAP, opts, 1, random.Random(seed)) == expected


def test_deterministic_given_rng_state():
    opts = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.2)
    a = [process_caption(CAP, opts, 1, random.Random(5)) for _ in range(3)]
    assert len(set(a)) == 1
    assert is_deterministic(CaptionOptions(keep_tokens=2, caption_dropout_every_n_epochs=3))
    assert not is_deterministic(opts)


def test_tag_frequency_shape_and_rules():
    base = ImageItem(path="/d/10_sks dog/a.png", caption="sks dog, Grass ,, sunny", repeats=10, is_reg=False)
    items = [
        base,
        replace(base, path="/d/10_sks dog/b.png", caption="sks dog, grass"),
        replace(base, path="/d/1_dog/r.png", caption="dog", is_reg=True, repeats=1),
        base,  # the same folder/image again (e.g. a second dataset): counted once, as kohya does
    ]
    freq = tag_frequency(items)
    assert freq == {"10_sks dog": {"sks dog": 2, "grass": 2, "sunny": 1}, "1_dog": {"dog": 1}}
    # Split on "," whatever the caption_separator; raw caption, not the prefixed one.
    odd = replace(base, caption="a; b", captions=CaptionOptions(caption_separator=";", caption_prefix="p"))
    assert tag_frequency([odd]) == {"10_sks dog": {"a; b": 1}}


def test_tag_frequency_from_plan_uses_subset_names_and_first_dataset_wins():
    def info(image_dir=None, metadata_file=None, is_reg=False):
        return SubsetInfo("s", image_dir, metadata_file, 1, is_reg, 1)

    a = ImageItem("/d/dogs/a.png", "dog, grass", 2, False, subset=0)
    r = ImageItem("/r/dogs/r.png", "dog", 1, True, subset=1)
    m = ImageItem("/imgs/x/m.png", "cat", 1, False, subset=0)
    first = DatasetSpec("dreambooth", 1, BucketOptions(), [a, r], subsets=[info("/d/dogs/"), info("/r/dogs", is_reg=True)])
    # The same folder again at another resolution, with a different caption: not counted again.
    second = DatasetSpec("dreambooth", 1, BucketOptions(), [ImageItem("/d/dogs/a.png", "other", 2, False, subset=0)],
                         subsets=[info("/d/dogs")])  # fmt: skip
    tuned = DatasetSpec("finetuning", 1, BucketOptions(), [m], subsets=[info(metadata_file="/meta/cats.json")])
    freq = tag_frequency(DatasetPlan([first, second, tuned]))
    # Same folder name within one dataset (train "dogs" and reg "dogs") adds up, as in kohya.
    assert freq == {"dogs": {"dog": 2, "grass": 1}, "cats.json": {"cat": 1}}


def test_a_byte_order_mark_is_removed_from_a_caption_file_with_a_warning(tmp_path):
    from trainer.config import load_config
    from tests.test_trainer_e2e import write_config

    config = write_config(str(tmp_path))
    (tmp_path / "dog" / "dog0.txt").write_bytes("\ufeffsks dog, sitting\n".encode("utf-8"))
    plan = load_config(config).dataset_plan()
    item = next(it for spec in plan.datasets for it in spec.items if it.path.endswith("dog0.png"))
    assert item.caption == "sks dog, sitting"
    assert any("1 caption files start with a UTF-8 byte-order mark (BOM), which was removed" in w and "dog0.txt" in w
               for w in plan.warnings)

"""The lab's world and scorers: deterministic scenes, captions, and readings that are exact on
ground-truth renders and hold up under noise (what a sampler's output looks like)."""

import pytest
import torch

from trainer.lab import score, world

ALL = world.Vocabulary()


@pytest.fixture(scope="module")
def truth():
    scenes = world.sample_scenes(400, seed=3, combos=ALL.combinations())
    return scenes, world.render_batch(scenes)


def test_scenes_and_renders_are_a_function_of_the_seed():
    a = world.sample_scenes(20, seed=5, combos=ALL.combinations())
    b = world.sample_scenes(20, seed=5, combos=ALL.combinations())
    assert a == b
    assert torch.equal(world.render_batch(a), world.render_batch(b))
    assert a != world.sample_scenes(20, seed=6, combos=ALL.combinations())


def test_captions_use_the_vocabulary():
    s = world.Scene("red", "circle", "solid", "white", 16, 16, 18)
    assert world.caption(s) == "a red circle on white"
    assert world.caption(world.Scene("blue", "star", "striped", "gray", 16, 16, 18)) == "a blue striped star on gray"


def test_shapes_sit_near_the_centre_at_sizes_in_range(truth):
    """The centred world the base was trained on: every centre within JITTER (1.5 px) of the
    image centre on each axis, both ends of the ranges reached."""
    scenes, _ = truth
    middle = world.IMAGE_SIZE / 2
    offsets = [max(abs(s.cx - middle), abs(s.cy - middle)) for s in scenes]
    sizes = [s.size for s in scenes]
    assert max(offsets) <= world.JITTER == 1.5 and max(offsets) > 1.4
    assert world.MIN_SIZE == 16 and world.MAX_SIZE == 22
    assert world.MIN_SIZE <= min(sizes) < world.MIN_SIZE + 0.2 and world.MAX_SIZE - 0.2 < max(sizes) <= world.MAX_SIZE


def test_shapes_stay_inside_the_image_with_a_margin(truth):
    scenes, images = truth
    for s, image in zip(scenes, images):
        mask = world.shape_mask(s.shape, s.cx, s.cy, s.size)
        assert mask.sum() > 40
        assert not mask[: world.MARGIN].any() and not mask[-world.MARGIN:].any()
        assert not mask[:, : world.MARGIN].any() and not mask[:, -world.MARGIN:].any()


def test_scorers_read_ground_truth_exactly(truth):
    scenes, images = truth
    acc = score.accuracy(score.read_batch(images), scenes)
    for kind in ("colour", "shape", "pattern", "background"):
        assert acc[kind] >= 0.99, (kind, acc)
    assert acc["shape_iou"] > 0.9


def test_scorers_hold_under_pixel_noise(truth):
    scenes, images = truth
    g = torch.Generator().manual_seed(0)
    noisy = (images.float() + 12 * torch.randn(images.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    acc = score.accuracy(score.read_batch(noisy), scenes)
    for kind in ("colour", "shape", "pattern", "background"):
        assert acc[kind] >= 0.97, (kind, acc)


def test_float_images_read_like_uint8(truth):
    scenes, images = truth
    r8 = score.read(images[0])
    rf = score.read(world.to_pixels(images[0]))
    assert r8.labels == rf.labels == scenes[0].labels


def test_an_empty_image_reads_as_no_shape():
    blank = world.render(world.Scene("red", "circle", "solid", "gray", 16, 16, 0.1))
    r = score.read(blank)
    assert (r.shape, r.colour, r.background) == ("none", "none", "gray")


def test_held_out_combinations_leave_every_label_in_training():
    vocab = world.Vocabulary(shapes=("circle", "square", "triangle", "cross"), patterns=("solid",))
    held = world.held_out(vocab, 5)
    kept = [c for c in vocab.combinations() if c not in held]
    assert 0.1 < len(held) / len(vocab.combinations()) < 0.3
    for axis, values in enumerate((vocab.colours, vocab.shapes, vocab.patterns, vocab.backgrounds)):
        assert {c[axis] for c in kept} == set(values)


def test_unknown_labels_are_a_config_error():
    from qrlora.errors import UserError

    with pytest.raises(UserError, match="shape"):
        world.Vocabulary(shapes=("circle", "hexagon"))

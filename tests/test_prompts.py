"""kohya's sample-prompt files."""

import json

from trainer.prompts import SamplePrompt, load_prompts, parse_prompt_line, parse_prompt_text

TEXT = """
# comments and blank lines are skipped
a photo of sks dog --n low quality, blurry --w 832 --h 1216 --d 42 --s 28 --l 6.5

   # an indented comment
watercolor painting of a fox --ss euler_a --s 5000 --g 3.5 --zz what
plain prompt
"""


def test_txt_flags():
    prompts = parse_prompt_text(TEXT)
    assert [p.prompt for p in prompts] == ["a photo of sks dog", "watercolor painting of a fox", "plain prompt"]
    first, second, third = prompts
    assert first.negative_prompt == "low quality, blurry"
    assert (first.width, first.height, first.seed, first.steps, first.scale) == (832, 1216, 42, 28, 6.5)
    assert first.unknown == [] and first.index == 0
    assert second.sampler == "euler_a" and second.steps == 1000  # kohya clamps steps to 1..1000
    assert second.extra == {"g": "3.5"} and second.unknown == ["--zz what"]
    assert third == SamplePrompt("plain prompt", index=2)


def test_flag_details():
    p = parse_prompt_line("dog --N bad hands --L 7 --ss ddim --s 1")
    assert p.negative_prompt == "bad hands" and p.scale == 7.0 and p.sampler == "ddim" and p.steps == 1
    assert parse_prompt_line("dog --l 1.2.3").unknown == ["--l 1.2.3"]
    assert parse_prompt_line("dog--w 512").prompt == "dog--w 512"  # a flag needs a space before it, as in kohya
    assert parse_prompt_line("dog --w 512 --").width == 512


def test_with_defaults():
    p = parse_prompt_line("dog --s 12").with_defaults(steps=30, scale=7.5, width=1024, height=1024, negative_prompt="")
    assert (p.steps, p.scale, p.width, p.height, p.negative_prompt) == (12, 7.5, 1024, 1024, "")


def test_toml_and_json_files(tmp_path):
    toml_file = tmp_path / "prompts.toml"
    toml_file.write_text(
        '[prompt]\nwidth = 1024\nheight = 1024\nsample_steps = 20\n'
        '[[prompt.subset]]\nprompt = "a dog"\nseed = 1\n'
        '[[prompt.subset]]\nprompt = "a cat"\nnegative_prompt = "blurry"\nscale = 5.0\nsample_sampler = "ddim"\n',
        encoding="utf-8",
    )
    dog, cat = load_prompts(str(toml_file))
    assert (dog.prompt, dog.width, dog.steps, dog.seed) == ("a dog", 1024, 20, 1)
    assert (cat.negative_prompt, cat.scale, cat.sampler, cat.index) == ("blurry", 5.0, "ddim", 1)

    json_file = tmp_path / "prompts.json"
    json_file.write_text(json.dumps([{"prompt": "a dog", "width": 512, "oops": 1}, "a cat --d 3"]), encoding="utf-8")
    dog, cat = load_prompts(str(json_file))
    assert dog.width == 512 and dog.unknown == ["oops"] and cat.seed == 3

    txt = tmp_path / "prompts.txt"
    txt.write_text(TEXT, encoding="utf-8")
    assert load_prompts(str(txt)) == parse_prompt_text(TEXT)

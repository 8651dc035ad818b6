"""The <qrlora:…> tag and the infotext field, without any host."""

import pytest

from qrlora_ext import syntax


def tag(text, default=1.0):
    return syntax.parse_tag(text.split(":"), default)


def test_name_and_lambda():
    t = tag("dog:0.8")
    assert (t.name, t.multiplier, t.te, t.unet, t.warnings) == ("dog", 0.8, 0.8, 0.8, [])


def test_default_lambda_from_settings():
    assert tag("dog", default=0.6).multiplier == 0.6
    assert tag("dog:", default=0.6).multiplier == 0.6


def test_te_and_unet_override_lambda():
    t = tag("dog:0.8:te=0.2:unet=1.1")
    assert (t.te, t.unet) == (0.2, 1.1)
    assert t.multiplier_for(True) == 0.2 and t.multiplier_for(False) == 1.1
    assert tag("dog:te=0").te == 0.0 and tag("dog:te=0").unet == 1.0


def test_reserved_keys_warn_and_unknown_keys_skip_the_tag():
    t = tag("dog:1:lbwe=ATTNDEEPOFF")
    assert t.options == {"lbwe": "ATTNDEEPOFF"}
    assert any("lbwe=" in w and "not supported" in w for w in t.warnings)
    # an option we do not know would silently give another image (a misspelt window applies at every step)
    with pytest.raises(syntax.TagError, match=r"<qrlora:dog>: unknown option color=red \(known: te=, unet=, lbw="):
        tag("dog:1:color=red")
    with pytest.raises(syntax.TagError, match=r"unknown option stopp=4 \(did you mean stop=\?\)"):
        tag("dog:1:stopp=4")
    assert tag("dog:1:0.5").warnings  # a third positional argument is not silently taken


def test_lbw_preset_list_and_step_window():
    twelve = "1,0,0,0,0,0,1,0.5,0,0,0,-1"
    t = tag(f"dog:0.8:lbw={twelve}:start=3:stop=10")
    assert (t.lbw, t.start, t.stop, t.warnings) == (twelve, 3, 10, [])
    assert tag("dog:lbw=content").lbw == "content"
    assert tag("dog").lbw is None and tag("dog").start is None
    assert (tag("dog:1:step=5-10").start, tag("dog:1:step=5-10").stop) == (5, 10)  # lbw's form
    assert (tag("dog:1:start=3.0").start, tag("dog:1:Stop=7").stop) == (3, 7)


@pytest.mark.parametrize("text, expected", [
    ("dog:1:lbw=1,0,R,0,0,0,1,0,0,0,0,0", r"<qrlora:dog>: lbw= weight 3 \('R'\) is not a number"),
    ("dog:1:lbw=1,0,0", r"<qrlora:dog>: lbw= has 3 weights; expected"),
    ("dog:1:lbw=1,0,nan,0,0,0,1,0,0,0,0,0", r"weight 3 \('nan'\) is not a finite number"),
    ("dog:1:lbw=", r"lbw= needs a preset name"),
    ("dog:1:lbw=a b", r"neither a preset name nor a list"),
    ("dog:1:start=x", r"start= expects a sampling step"),
    ("dog:1:stop=-2", r"stop= expects a sampling step"),
    ("dog:1:start=5:stop=5", r"stop=5 must be after start=5"),
    ("dog:1:start=2.5", r"start= expects a sampling step .* not '2.5' \(fractions of the steps are not taken"),
    ("dog:1:step=2-x", r"step= expects a sampling step"),
    ("dog:1:step=2-4:start=1", r"either as step=FIRST-END or as start=/stop="),
])
def test_bad_block_weights_and_windows_name_the_tag(text, expected):
    with pytest.raises(syntax.TagError, match=expected):
        tag(text)


@pytest.mark.parametrize("bad", ["dog:abc", "dog:nan", "dog:inf", "dog:1:te=x", ""])
def test_bad_numbers_and_empty(bad):
    with pytest.raises(syntax.TagError):
        tag(bad)


@pytest.mark.parametrize("name", ["../../x", "/etc/passwd", "a/../b", "..", "./x", "a//b", "\\\\server\\x", "a\\..\\b"])
def test_names_cannot_leave_the_folder(name):
    with pytest.raises(syntax.TagError, match="inside the QR-LoRA folder"):
        syntax.check_name(name)


def test_relative_names_are_normalised():
    assert syntax.check_name("styles\\water color") == "styles/water color"


def test_infotext_round_trip_and_paste():
    text = syntax.format_hashes({"dog": "aaaaaaaaaaaa", "a:b,c": "bbbbbbbbbbbb"})
    assert text == "dog: aaaaaaaaaaaa, abc: bbbbbbbbbbbb"
    hashes = syntax.parse_hashes(text)
    assert hashes == {"dog": "aaaaaaaaaaaa", "abc": "bbbbbbbbbbbb"}
    renamed = {"aaaaaaaaaaaa": "pets/dog_v2"}
    prompt = "x <qrlora:dog:0.5> y <qrlora:cat:1> <lora:dog:1> <qrlora:dog>"
    out = syntax.rewrite_prompt(prompt, hashes, renamed.get)
    assert out == "x <qrlora:pets/dog_v2:0.5> y <qrlora:cat:1> <lora:dog:1> <qrlora:pets/dog_v2>"

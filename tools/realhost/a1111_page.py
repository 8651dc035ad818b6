"""Small helpers the real-A1111 check's steps share: comparing images, keeping screenshots small,
and working Gradio 3.41's widgets (dropdowns, the output gallery) from Playwright."""

from __future__ import annotations

import io
import os
import re

from PIL import Image, ImageChops, ImageStat


def pixel_difference(a: Image.Image, b: Image.Image) -> tuple[int, float]:
    """(max, mean) absolute difference over all pixel values; (0, 0.0) is bit-identical."""
    if a.size != b.size:
        return 255, 255.0
    diff = ImageChops.difference(a, b)
    peak = max(high for _, high in diff.getextrema())
    return peak, sum(ImageStat.Stat(diff).mean) / len(diff.getbands())


def shrink_png(path: str, limit: int = 100_000) -> int:
    """Keep a screenshot under ``limit`` bytes (the repository's rule for docs/img): 256 colours,
    then shrink until it fits."""
    image = Image.open(path).convert("RGB")
    while True:
        image.quantize(256).save(path, optimize=True)
        if os.path.getsize(path) <= limit or image.width < 200:
            return os.path.getsize(path)
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)


def exact(text: str):
    """A has_text pattern for an element whose whole text is ``text`` (Gradio pads with whitespace)."""
    return re.compile(rf"^\s*{re.escape(text)}\s*$")


def choose(dropdown, *values: str) -> None:
    """Pick ``values`` in a Gradio dropdown (one, or several for a multiselect) as a user does:
    click its box, click the option in the list that opens."""
    box = dropdown.locator("input").first
    for value in values:
        box.click()
        # an option's text starts with a check mark, hidden unless it is selected
        option = re.compile(rf"^\s*(✓\s*)?{re.escape(value)}\s*$")
        dropdown.locator("ul.options li", has_text=option).first.click()
    box.press("Escape")


def gallery_images(page, gallery: str, base_url: str) -> list[tuple[Image.Image, str]]:
    """Every image of an output gallery in order, with the infotext written into its PNG (the
    WebUI serves the saved file, which is what a user downloads or drops on PNG Info)."""
    sources = page.locator(f"{gallery} .thumbnail-item img").evaluate_all("els => els.map(e => e.getAttribute('src'))")
    if not sources:  # a single image has no thumbnails
        sources = [page.locator(f"{gallery} img").first.get_attribute("src")]
    unique = list(dict.fromkeys(sources))
    images = []
    for src in unique:
        data = page.request.get(src if src.startswith("http") else base_url + "/" + src.lstrip("/")).body()
        image = Image.open(io.BytesIO(data))
        images.append((image.convert("RGB"), image.info.get("parameters", "")))
    return images

"""Draw the demo's tiny training images (deterministic; already committed in examples/dog/).

A cartoon "dog" (a brown blob with ears and eyes) on different backgrounds and at different
sizes and aspect ratios, so the demo exercises buckets. Run it to regenerate them.
"""

import os
import random

from PIL import Image, ImageDraw

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dog")
SIZES = [(96, 96), (128, 96), (96, 128), (112, 112), (128, 128), (96, 80)]
BACKGROUNDS = [(120, 180, 240), (150, 220, 150), (240, 230, 180), (200, 200, 220), (250, 200, 200), (180, 220, 230)]


def draw(size, background, rng):
    w, h = size
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    cx, cy, r = w // 2 + rng.randint(-8, 8), h // 2 + rng.randint(-6, 6), min(w, h) // 4
    brown = (120 + rng.randint(-10, 10), 72, 40)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=brown)  # head
    d.ellipse([cx - r - r // 2, cy - r, cx - r // 2, cy + r // 3], fill=(80, 50, 30))  # ears
    d.ellipse([cx + r // 2, cy - r, cx + r + r // 2, cy + r // 3], fill=(80, 50, 30))
    for ex in (cx - r // 3, cx + r // 3):
        d.ellipse([ex - 3, cy - r // 4 - 3, ex + 3, cy - r // 4 + 3], fill=(10, 10, 10))
    d.ellipse([cx - 5, cy + r // 4, cx + 5, cy + r // 4 + 7], fill=(20, 10, 10))  # nose
    return img


def main():
    os.makedirs(HERE, exist_ok=True)
    rng = random.Random(0)
    for i, (size, bg) in enumerate(zip(SIZES, BACKGROUNDS)):
        draw(size, bg, rng).save(os.path.join(HERE, f"dog{i}.png"), optimize=True)
        with open(os.path.join(HERE, f"dog{i}.txt"), "w", encoding="utf-8") as f:
            f.write("a photo of sks dog\n")


if __name__ == "__main__":
    main()

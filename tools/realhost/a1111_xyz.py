"""The X/Y/Z plot and ``lbw=`` steps of the real-A1111 check (``a1111_check.py``), driven through
the UI: the built-in "X/Y/Z plot" script with our "QR-LoRA λ" and "QR-LoRA block weights" axes,
and a per-block tag typed into the prompt, generated, and pasted back.

They run after the UI's own untagged and ``<qrlora:dog:1>`` generations (``UI.images``), against
which the cells are compared pixel for pixel, and after the basis was computed, so a sweep that
computed it again would show in the console.
"""

from __future__ import annotations

import re

from a1111_page import choose, exact, gallery_images, pixel_difference

XYZ = "#script_txt2img_xyz_plot_"  # the script's elem_id prefix (Script.elem_id: script_{tab}_{title}_)
LAMBDAS = ("0", "0.5", "1")
# B-LoRA's two blocks, and ALL, which must equal the plain tag (the dropdown lists names in lower case)
PRESETS = ("content", "style", "all")
BASIS_WORK = re.compile(r"computing the rank-\d+ basis|computing basis \d+/\d+|basis \S+ computed in")


class GridSteps:
    def __init__(self, ui, prompt: str, tag: str):
        """``ui``: a1111_check.UI after its generate step; ``prompt`` the untagged prompt, ``tag``
        the ``<qrlora:dog:1>`` it generated with."""
        self.ui, self.page, self.results = ui, ui.page, ui.results
        self.prompt, self.tag = prompt, tag
        self.cells: dict[str, object] = {}  # preset -> its cell's image, for the lbw= step

    # ------------------------------------------------------------ driving the script
    def select_script(self, title: str) -> None:
        choose(self.page.locator("#tab_txt2img #script_list"), title)

    def axis_values_dropdown(self, axis: str = "x"):
        return self.page.locator("#tab_txt2img .gradio-dropdown:visible",
                                 has=self.page.locator("span", has_text=exact(f"{axis.upper()} values")))

    def run_grid(self, axis_label: str, values: tuple[str, ...], shot: str) -> tuple[list, float, str, str]:
        """Generate an X/Y/Z grid over ``values`` of ``axis_label`` on X; returns the gallery's
        images (grid first, then one per cell) with their infotexts, the seconds, the console
        written meanwhile and the screenshot's description."""
        ui, page = self.ui, self.page
        ui.fill_generation(f"{self.prompt} {self.tag}")
        self.select_script("X/Y/Z plot")
        choose(page.locator(f"{XYZ}x_type"), axis_label)
        include = page.locator(f"{XYZ}include_lone_images input")
        if not include.is_checked():
            include.check()
        dropdown = self.axis_values_dropdown()
        page.wait_for_timeout(500)  # the type's change event shows the textbox or the choices
        if dropdown.count():
            choose(dropdown, *values)
        else:
            page.fill(f"{XYZ}x_values textarea", ", ".join(values))
        mark = len(ui.webui.console())
        try:
            _, seconds = ui.click_generate()
            images = gallery_images(page, "#txt2img_gallery", ui.webui.url)
            described = ui.screenshot_around([page.locator("#txt2img_prompt"), page.locator("#txt2img_gallery"),
                                              page.locator("#tab_txt2img #script_list"),
                                              page.locator(f"{XYZ}x_type").locator("xpath=../..")], shot)
        finally:
            self.select_script("None")
        return images, seconds, ui.webui.console()[mark:], described

    # ------------------------------------------------------------ the checks
    def check_lambda_sweep(self) -> None:
        images, seconds, console, shot = self.run_grid("QR-LoRA λ", LAMBDAS, "a1111-xyz-lambda.png")
        cells = images[1:]
        if len(cells) != len(LAMBDAS):
            raise RuntimeError(f"the gallery has {len(images)} images, expected the grid and {len(LAMBDAS)} cells")
        plain, tagged = self.ui.images["untagged"], self.ui.images["tagged"]
        prompts = [re.search(r"<qrlora:[^>]*>", info).group(0) if "<qrlora:" in info else "?" for _, info in cells]
        zero, _ = pixel_difference(cells[0][0], plain)
        one, _ = pixel_difference(cells[2][0], tagged)
        half_vs_zero, _ = pixel_difference(cells[1][0], cells[0][0])
        half_vs_one, _ = pixel_difference(cells[1][0], cells[2][0])
        expected_tags = [f"<qrlora:dog:{v}>" for v in LAMBDAS]
        basis_work = BASIS_WORK.findall(console)
        self.results.record(
            "xyz-lambda",
            zero == 0 and one == 0 and half_vs_zero > 0 and half_vs_one > 0 and prompts == expected_tags,
            f"X/Y/Z plot, X = QR-LoRA λ {', '.join(LAMBDAS)} on '{self.prompt} {self.tag}': grid "
            f"{images[0][0].size[0]}x{images[0][0].size[1]} + {len(cells)} cells in {seconds:.1f} s; cell tags "
            f"{prompts}; λ=0 vs the untagged UI image: max difference {zero}; λ=1 vs the tagged one: {one}; "
            f"λ=0.5 differs from λ=0 (max {half_vs_zero}) and λ=1 (max {half_vs_one}); screenshot {shot}")
        self.results.record("xyz-no-basis-work", not basis_work,
                            "console during the λ sweep: " + (f"basis work {basis_work}" if basis_work
                                                              else "no basis computed"))

    def check_block_sweep(self) -> None:
        images, seconds, console, shot = self.run_grid("QR-LoRA block weights", PRESETS, "a1111-xyz-blocks.png")
        cells = images[1:]
        if len(cells) != len(PRESETS):
            raise RuntimeError(f"the gallery has {len(images)} images, expected the grid and {len(PRESETS)} cells")
        self.cells = {preset: image for preset, (image, _) in zip(PRESETS, cells)}
        plain, tagged = self.ui.images["untagged"], self.ui.images["tagged"]
        tags = [re.search(r"<qrlora:[^>]*>", info).group(0) if "<qrlora:" in info else "?" for _, info in cells]
        content, style, every = (self.cells[p] for p in PRESETS)
        diffs = {"content vs style": pixel_difference(content, style)[0],
                 "content vs untagged": pixel_difference(content, plain)[0],
                 "content vs the full tag": pixel_difference(content, tagged)[0],
                 "style vs untagged": pixel_difference(style, plain)[0],
                 "style vs the full tag": pixel_difference(style, tagged)[0]}
        all_vs_tag = pixel_difference(every, tagged)[0]
        basis_work = BASIS_WORK.findall(console)
        self.results.record(
            "xyz-blocks",
            all(d > 0 for d in diffs.values()) and all_vs_tag == 0 and not basis_work
            and tags == [f"<qrlora:dog:1:lbw={p}>" for p in PRESETS],
            f"X/Y/Z plot, X = QR-LoRA block weights {', '.join(PRESETS)} (picked in the axis's dropdown): "
            f"{len(cells)} cells in {seconds:.1f} s, cell tags {tags}; max differences "
            + ", ".join(f"{k} {v}" for k, v in diffs.items())
            + f"; all vs the plain tag {all_vs_tag}; console: "
            + (f"basis work {basis_work}" if basis_work else "no basis work") + f"; screenshot {shot}")

    def check_lbw_prompt(self) -> None:
        """``lbw=content`` typed into the prompt: the same image as the sweep's content cell, in the
        infotext, and restored by paste."""
        ui = self.ui
        tag = self.tag[:-1] + ":lbw=content>"
        image, info, seconds = ui.generate(f"{self.prompt} {tag}")
        reference = self.cells.get("content")
        vs_cell = pixel_difference(image, reference)[0] if reference is not None else None
        vs_tag = pixel_difference(image, ui.images["tagged"])[0]
        vs_plain = pixel_difference(image, ui.images["untagged"])[0]
        in_info = tag in info
        self.results.record(
            "lbw-prompt", vs_cell == 0 and vs_tag > 0 and vs_plain > 0 and in_info,
            f"UI: '{self.prompt} {tag}' ({seconds:.1f} s): vs the sweep's content cell max difference {vs_cell}, "
            f"vs the full tag {vs_tag}, vs untagged {vs_plain}; infotext {'has' if in_info else 'lacks'} {tag}")
        restored = ui.paste(info)
        self.results.record("lbw-paste", restored.strip() == f"{self.prompt} {tag}",
                            f"pasting that infotext gives the prompt {restored!r}")
        ui.set_prompt("")


def check_grids(ui, prompt: str, tag: str) -> None:
    """``ui``: a1111_check.UI; records xyz-lambda, xyz-no-basis-work, xyz-blocks, lbw-prompt, lbw-paste."""
    steps = GridSteps(ui, prompt, tag)
    ui.results.guarded("xyz-lambda", steps.check_lambda_sweep)
    ui.results.guarded("xyz-blocks", steps.check_block_sweep)
    ui.results.guarded("lbw-prompt", steps.check_lbw_prompt)

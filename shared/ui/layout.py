"""The QR-LoRA tools page: one gradio Blocks for the WebUI tab and for ``qrlora ui``.

Only what gradio 3.41 (Automatic1111) and 4.40 (Forge) both have, checked in both versions'
sources: ``Blocks(analytics_enabled=, title=)``, ``Tabs``, ``Tab(label)``, ``Row``, ``Column(scale)``,
``Markdown(value)``, ``Textbox(label, value, lines, placeholder, interactive, elem_id)``,
``Dropdown(choices, value, label, elem_id)``, ``Slider(minimum, maximum, value, step, label,
elem_id)``, ``Number(value, precision, label, elem_id)``, ``Radio(choices, value, label,
elem_id)``, ``Checkbox(value, label, elem_id)``, ``Button(value, variant="primary"|"secondary"|
"stop", visible, elem_id)``, ``HTML(value, elem_id)``,
``State(value)``, ``gr.update(...)`` (not the components' ``.update``, gone in 4.x),
``Progress()`` as a default argument called with a fraction and ``desc=``, and the events
``.click(fn, inputs, outputs)`` and ``.then(...)``. Nothing from 4.x only (``gr.on``,
``every=``, ``show_copy_button``, ``allow_custom_value``), nothing from 3.x only (``style()``).
"""

from __future__ import annotations

import base64
import functools
import html
import os
from typing import Callable

from . import handlers

FUSE_SLOTS = 4  # files in one fusion (fixed slots: both gradio versions can show and hide them)
TITLE = "QR-LoRA"


def import_gradio():
    """gradio; with huggingface_hub 1.x, which no longer has ``HfFolder`` that gradio 4.x's
    login helper imports at start, a stand-in that reads the token the current way is put
    there first (the UI never logs in; WebUIs ship a hub that still has it)."""
    try:
        import huggingface_hub

        if not hasattr(huggingface_hub, "HfFolder"):
            class HfFolder:
                @staticmethod
                def get_token():
                    return huggingface_hub.get_token()

            huggingface_hub.HfFolder = HfFolder
    except ImportError:
        pass
    try:
        import gradio
    except ImportError:
        from ..errors import UserError

        raise UserError("qrlora ui needs gradio 4: pip install 'qrlora[ui]' (inside a WebUI it is already there)") from None
    return gradio


def _status(result: handlers.Result) -> str:
    return ("error: " if result.error else "") + result.message


def _image_html(png: bytes | None, alt: str) -> str:
    """A PNG inline (a data: URL): no file serving, which the two gradio versions restrict differently."""
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def build(folder: Callable[[], str], basis_folder: Callable[[], str] | None = None, cache: Callable[[], str | None] | None = None):
    """The page. ``folder()``: where ΔR, basis and LoRA files are listed and written;
    ``basis_folder()``: where a computed basis file goes (default: ``folder()``); ``cache()``:
    the basis cache (default ``$QRLORA_CACHE/basis``). Callables, so the WebUI's settings apply
    without a restart."""
    gr = import_gradio()
    basis_folder = basis_folder or folder
    cache = cache or (lambda: None)
    dropdowns = []

    def file_list(label: str, elem_id: str):
        d = gr.Dropdown(choices=handlers.list_files(folder()), value=None, label=label, elem_id=elem_id)
        dropdowns.append(d)
        return d

    def progress_callback(progress):
        def report(done: int, total: int, current: str = "") -> None:
            progress(done / max(1, total), desc=f"basis: {done}/{total} layers")

        return report

    def writer(button, overwrite, pending, status, extra, run: Callable[..., handlers.Result], inputs):
        """``run(confirmed, *inputs)``: ``button`` runs it without permission to replace an
        existing output; ``overwrite`` (shown only once the output exists) with permission for
        the path it asked about, held in ``pending``. gradio reads ``run``'s signature through
        ``functools.wraps`` (its ``progress=gr.Progress()`` default included)."""

        @functools.wraps(run)
        def shown(*values):
            result = run(*values)
            return [_status(result), gr.update(visible=bool(result.ask)), result.ask] + [result.details for _ in extra]

        outputs = [status, overwrite, pending, *extra]
        blank = gr.State("")
        button.click(shown, inputs=[blank, *inputs], outputs=outputs).then(refresh, inputs=dropdowns, outputs=dropdowns)
        overwrite.click(shown, inputs=[pending, *inputs], outputs=outputs).then(refresh, inputs=dropdowns, outputs=dropdowns)

    def refresh(*current):
        files = handlers.list_files(folder())
        return [gr.update(choices=files, value=v if v in files else None) for v in current]

    with gr.Blocks(analytics_enabled=False, title=TITLE) as page:
        with gr.Row():
            with gr.Column(scale=4):
                gr.Markdown(f"Files in **{folder()}** (ΔR files, bases, LoRAs, official QR-LoRA files);"
                            " outputs are written there.")
            with gr.Column(scale=1):
                refresh_button = gr.Button("Refresh file list", elem_id="qrlora_refresh")
        with gr.Tabs():
            with gr.Tab("Inspect"):
                inspect_file = file_list("file", "qrlora_inspect_file")
                inspect_run = gr.Button("Inspect", variant="primary", elem_id="qrlora_inspect_run")
                inspect_status = gr.Textbox(label="result", interactive=False, elem_id="qrlora_inspect_status")
                inspect_details = gr.Textbox(label="details", lines=16, interactive=False, elem_id="qrlora_inspect_details")

                def do_inspect(name):
                    r = handlers.inspect(folder(), name)
                    return _status(r), r.details

                inspect_run.click(do_inspect, inputs=[inspect_file], outputs=[inspect_status, inspect_details])

            with gr.Tab("Fuse"):
                gr.Markdown("Σ λ·ΔR of ΔR files trained on one basis, written as one ΔR file.")
                fuse_inputs = []
                for i in range(FUSE_SLOTS):
                    with gr.Row():
                        fuse_inputs.append(file_list(f"ΔR file {i + 1}", f"qrlora_fuse_file{i}"))
                        fuse_inputs.append(gr.Slider(minimum=-2, maximum=2, value=1.0, step=0.05, label=f"λ {i + 1}",
                                                     elem_id=f"qrlora_fuse_weight{i}"))
                fuse_output = gr.Textbox(label="output file", placeholder="fused.safetensors", elem_id="qrlora_fuse_output")
                with gr.Row():
                    fuse_run = gr.Button("Fuse", variant="primary", elem_id="qrlora_fuse_run")
                    fuse_overwrite = gr.Button("Overwrite", variant="stop", visible=False, elem_id="qrlora_fuse_overwrite")
                fuse_pending = gr.State("")
                fuse_status = gr.Textbox(label="result", interactive=False, elem_id="qrlora_fuse_status")

                def do_fuse(confirmed, *values):
                    *slots, output = values
                    return handlers.fuse(folder(), list(slots[0::2]), list(slots[1::2]), output, confirmed)

                writer(fuse_run, fuse_overwrite, fuse_pending, fuse_status, [], do_fuse, [*fuse_inputs, fuse_output])

            with gr.Tab("Export"):
                gr.Markdown("A ΔR file as a standard LoRA (up = Q, down = ΔR) for `<lora:…>`, ComfyUI and diffusers.")
                export_file = file_list("ΔR file", "qrlora_export_file")
                export_to = gr.Radio(choices=["kohya", "diffusers"], value="kohya", label="format", elem_id="qrlora_export_to")
                with gr.Row():
                    export_basis = file_list("basis file (unless the ΔR file embeds Q)", "qrlora_export_basis")
                    export_base = gr.Textbox(label="or the base checkpoint (path)", elem_id="qrlora_export_base")
                export_output = gr.Textbox(label="output file", placeholder="dog-lora.safetensors", elem_id="qrlora_export_output")
                with gr.Row():
                    export_run = gr.Button("Export", variant="primary", elem_id="qrlora_export_run")
                    export_overwrite = gr.Button("Overwrite", variant="stop", visible=False, elem_id="qrlora_export_overwrite")
                export_pending = gr.State("")
                export_status = gr.Textbox(label="result", interactive=False, elem_id="qrlora_export_status")
                export_details = gr.Textbox(label="details", lines=3, interactive=False, elem_id="qrlora_export_details")

                def do_export(confirmed, name, to, basis, base, output, progress=gr.Progress()):
                    return handlers.export(folder(), name, to, basis, base, output, confirmed, cache(),
                                           progress=progress_callback(progress))

                writer(export_run, export_overwrite, export_pending, export_status, [export_details], do_export,
                       [export_file, export_to, export_basis, export_base, export_output])

            with gr.Tab("Import official"):
                gr.Markdown("A file saved by the official QR-LoRA code, as a ΔR file on the canonical basis.")
                import_file = file_list("official file", "qrlora_import_file")
                with gr.Row():
                    import_basis = file_list("basis file", "qrlora_import_basis")
                    import_base = gr.Textbox(label="or the base checkpoint (path)", elem_id="qrlora_import_base")
                with gr.Row():
                    import_tolerance = gr.Number(value=0.02, label="tolerance (largest relative ΔW change)",
                                                 elem_id="qrlora_import_tolerance")
                    import_force = gr.Checkbox(value=False, label="write even when layers move more", elem_id="qrlora_import_force")
                import_output = gr.Textbox(label="output file", placeholder="imported.safetensors", elem_id="qrlora_import_output")
                with gr.Row():
                    import_run = gr.Button("Import", variant="primary", elem_id="qrlora_import_run")
                    import_overwrite = gr.Button("Overwrite", variant="stop", visible=False, elem_id="qrlora_import_overwrite")
                import_pending = gr.State("")
                import_status = gr.Textbox(label="result", interactive=False, elem_id="qrlora_import_status")
                import_details = gr.Textbox(label="report", lines=6, interactive=False, elem_id="qrlora_import_details")

                def do_import(confirmed, name, basis, base, tolerance, force, output, progress=gr.Progress()):
                    return handlers.import_official(folder(), name, basis, base, output, confirmed, cache(), tolerance,
                                                    force, progress=progress_callback(progress))

                writer(import_run, import_overwrite, import_pending, import_status, [import_details], do_import,
                       [import_file, import_basis, import_base, import_tolerance, import_force, import_output])

            with gr.Tab("Similarity"):
                gr.Markdown("Per-layer cosine of two adapters (two ΔR files on one basis, a ΔR file and a LoRA, two LoRAs).")
                with gr.Row():
                    sim_a = file_list("first file", "qrlora_sim_a")
                    sim_b = file_list("second file", "qrlora_sim_b")
                with gr.Row():
                    sim_basis = file_list("basis file (a ΔR file against a LoRA)", "qrlora_sim_basis")
                    sim_base = gr.Textbox(label="or the base checkpoint (path)", elem_id="qrlora_sim_base")
                sim_run = gr.Button("Compare", variant="primary", elem_id="qrlora_sim_run")
                sim_status = gr.Textbox(label="result", interactive=False, elem_id="qrlora_sim_status")
                sim_details = gr.Textbox(label="summary", lines=5, interactive=False, elem_id="qrlora_sim_details")
                sim_plot = gr.HTML(elem_id="qrlora_sim_plot")

                def do_similarity(a, b, basis, base, progress=gr.Progress()):
                    r = handlers.similarity(folder(), a, b, basis, base, cache(), progress=progress_callback(progress))
                    return _status(r), r.details, _image_html(r.image, "cosine per layer")

                sim_run.click(do_similarity, inputs=[sim_a, sim_b, sim_basis, sim_base],
                              outputs=[sim_status, sim_details, sim_plot])

            with gr.Tab("Basis"):
                gr.Markdown("The canonical basis of a base checkpoint (computed once, then cached), or whether"
                            " a basis file is that checkpoint's.")
                basis_checkpoint = gr.Textbox(label="base checkpoint (path)", elem_id="qrlora_basis_checkpoint")
                with gr.Row():
                    basis_rank = gr.Number(value=16, precision=0, label="rank", elem_id="qrlora_basis_rank")
                    basis_targets = gr.Textbox(label="targets (preset or patterns; empty: the architecture's default)",
                                               elem_id="qrlora_basis_targets")
                basis_output = gr.Textbox(label="basis file to write", placeholder="basis-r16.safetensors",
                                          elem_id="qrlora_basis_output")
                with gr.Row():
                    basis_run = gr.Button("Compute", variant="primary", elem_id="qrlora_basis_run")
                    basis_overwrite = gr.Button("Overwrite", variant="stop", visible=False, elem_id="qrlora_basis_overwrite")
                basis_pending = gr.State("")
                check_file = file_list("basis file to check against the checkpoint", "qrlora_check_file")
                check_run = gr.Button("Check", elem_id="qrlora_check_run")
                basis_status = gr.Textbox(label="result", interactive=False, elem_id="qrlora_basis_status")
                basis_details = gr.Textbox(label="details", lines=3, interactive=False, elem_id="qrlora_basis_details")

                def do_basis(confirmed, checkpoint, rank, targets, output, progress=gr.Progress()):
                    return handlers.compute_basis(checkpoint, rank, targets, basis_folder(), output, confirmed, cache(),
                                                  progress=progress_callback(progress))

                writer(basis_run, basis_overwrite, basis_pending, basis_status, [], do_basis,
                       [basis_checkpoint, basis_rank, basis_targets, basis_output])

                def do_check(name, checkpoint, progress=gr.Progress()):
                    r = handlers.check_basis(folder(), name, checkpoint, cache(), progress=progress_callback(progress))
                    return _status(r), r.details

                check_run.click(do_check, inputs=[check_file, basis_checkpoint], outputs=[basis_status, basis_details])

        refresh_button.click(refresh, inputs=dropdowns, outputs=dropdowns)
    return page


def launch(folder: str, port: int | None = None, host: str = "127.0.0.1", basis_cache: str | None = None,
           block: bool = True):
    """``qrlora ui``: the page on its own, no WebUI."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline tool
    folder = os.path.abspath(folder)
    page = build(lambda: folder, cache=lambda: basis_cache)
    page.queue()  # progress bars need the queue (gradio 3.x has it off by default)
    page.launch(server_name=host, server_port=port, inbrowser=False, show_api=False, prevent_thread_lock=not block)
    return page

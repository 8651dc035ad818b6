"""The QR-LoRA tools page (inspect, fuse, export, import official, similarity, basis): the
WebUI's "QR-LoRA" tab and ``qrlora ui``. Only this package imports gradio, and only when a
page is built: ``import qrlora`` and the other commands never do.

``handlers``: what each button does, as plain functions (tested without a browser);
``layout``: the page itself, on the gradio subset that A1111 (3.41) and Forge (4.40) share.
"""

TAB_TITLE = "QR-LoRA"
TAB_ID = "qrlora_tools"


def build(folder, basis_folder=None, cache=None):
    from .layout import build as build_page

    return build_page(folder, basis_folder, cache)


def launch(folder, port=None, host="127.0.0.1", basis_cache=None, block=True):
    from .layout import launch as launch_page

    return launch_page(folder, port, host, basis_cache, block)

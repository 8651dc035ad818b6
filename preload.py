"""Command-line options, added by the WebUI before it parses its arguments."""

import os


def preload(parser):
    try:
        from modules import paths

        models = paths.models_path
    except Exception:  # outside a WebUI
        models = "models"
    try:
        from modules.paths_internal import normalized_filepath as path_type
    except Exception:
        path_type = str
    parser.add_argument("--qrlora-dir", type=path_type, default=os.path.join(models, "QRLoRA"),
                        help="folder with QR-LoRA ΔR files (.safetensors)")
    # Beside the QR-LoRA folder, not inside it: the Extra Networks page shows every subfolder of
    # its folders as a folder button, and the basis cache (files and entries/) is not a card folder.
    parser.add_argument("--qrlora-basis-dir", type=path_type, default=os.path.join(models, "QRLoRA-basis"),
                        help="folder where QR-LoRA keeps the bases it computes or is given")

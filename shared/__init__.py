"""QR-LoRA core: canonical basis, ΔR files, key maps, fusion, export/import.

Runs inside the WebUIs too, so it imports only torch and safetensors at module level, and
only relative imports inside the package (another extension may own the top-level name
``shared`` in ``sys.modules``).
"""

__version__ = "0.1.0"

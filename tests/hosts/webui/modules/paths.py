"""Stand-in: modules/paths.py ``models_path`` (A1111 / Forge)."""
import os

models_path = os.environ.get("QRLORA_TEST_MODELS", "models")

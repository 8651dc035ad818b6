"""kohya-style QR-LoRA trainer: ``python -m trainer --config dog.toml``."""

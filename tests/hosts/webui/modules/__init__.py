"""Stand-in of the WebUI ``modules`` package (A1111 v1.10 / Forge): only what QR-LoRA touches."""

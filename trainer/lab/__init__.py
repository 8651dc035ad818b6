"""The lab: a procedural world with exact scorers, and a tiny SDXL-architecture model trained on it.

``world`` draws and renders scenes with captions, ``score`` reads the labels back from an
image, ``model`` builds the lab base model (an SDXL UNet, the tiny SDXL's two text encoders and
a pixel-space VAE), ``pretrain`` trains it (``python -m trainer.lab pretrain``). See docs/lab.md.
"""

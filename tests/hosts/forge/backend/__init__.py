"""Stand-in of Forge's ``backend`` package: patchers and LoRA merging (see backend/patcher)."""

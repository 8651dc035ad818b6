"""Stand-in of Forge backend/args.py ``dynamic_args`` (``online_lora`` is set by the UI's
"Diffusion in Low Bits" choice)."""

dynamic_args = {"online_lora": False}

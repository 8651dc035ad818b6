"""Stand-ins of the WebUI interfaces the extension uses (no WebUI code: written from reading
A1111 v1.10.1 and Forge ``dfdcbab``; each file cites what it reproduces).

- ``webui/modules``: the ``modules`` package both hosts share (extra_networks, script_callbacks,
  shared/options, scripts, ui_extra_networks, paths, and the sampling step loop of
  sd_samplers_cfg_denoiser);
- ``a1111_lora``: A1111's built-in Lora extension (network, networks, network_lora, lora_patches,
  extra_networks_lora);
- ``forge``: Forge's ``backend`` (ModelPatcher/UnetPatcher/CLIP, LoraLoader, merge_lora_to_weight)
  and the ``modules_forge`` marker; ``forge_lora``: Forge's built-in LoRA extension;
- ``models``: module trees built from the tiny SGM-layout SDXL checkpoint with the hosts' names;
- ``harness``: installs one host in ``sys.modules``, loads ``scripts/qrlora.py`` as the host
  does, and runs generations the way each host's ``processing.py`` does.
"""

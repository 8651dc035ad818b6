"""The WebUI extension: ``<qrlora:name:λ>`` in Automatic1111 (v1.9+) and Forge.

Inside a WebUI this package is loaded by ``scripts/qrlora.py`` under a private name
(``qrlora_ext``) and reaches the core through ``extension.core`` (``qrlora``), so
it keeps working when another extension already owns the top-level names ``shared``,
``extension`` or ``trainer``. Only relative imports are used inside the package.

Host-independent: ``syntax`` (tags, infotext), ``library`` (files), ``bases`` (basis
resolution), ``planner`` (fusion), ``keymap`` (layer names), ``settings``, ``engine``.
One thin adapter per host: ``a1111``, ``forge``; ``webui`` and ``page`` hold the glue
both hosts share (options, callbacks, card page, API).
"""

"""Stand-in marker: Forge has a ``modules_forge`` package (``modules_forge/forge_version.py``); A1111 has not."""

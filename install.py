"""Run by the WebUI when the extension is installed or updated.

QR-LoRA needs only what every A1111 and Forge install already has (torch and safetensors),
so nothing is installed here: the versions are checked and anything wrong is printed.
"""

import re
import sys
from importlib import metadata

REQUIRED = {"torch": (2, 1), "safetensors": (0, 4)}


def _version(text):
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:2])


def check():
    problems = []
    if sys.version_info < (3, 10):
        problems.append(f"Python {sys.version.split()[0]} is too old: QR-LoRA needs Python 3.10 or newer")
    for package, minimum in REQUIRED.items():
        try:
            found = metadata.version(package)
        except metadata.PackageNotFoundError:
            problems.append(f"{package} is not installed (needed: >= {'.'.join(map(str, minimum))})")
            continue
        if _version(found) < minimum:
            problems.append(f"{package} {found} is too old: QR-LoRA needs >= {'.'.join(map(str, minimum))}")
    return problems


if __name__ == "__main__":
    for problem in check():
        print(f"[QR-LoRA] {problem}")

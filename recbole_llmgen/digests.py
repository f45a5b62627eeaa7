"""Digests of files by content: a file's SHA-256 cached by its real path, size and modification time
(``~/.cache/recbole_llmgen/digests.json``: an unchanged file is read once, not at every use), several
files' digest by name, and the identity of the weights behind an ``llm_path`` (the benchmark's run
hash and a checkpoint's base model both use it: the same weights at another path agree, other
weights at the same path do not).
"""

from __future__ import annotations

import hashlib
import json
import os

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "recbole_llmgen", "digests.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")  # with config.json: a model's identity
_cache: dict[str, str] | None = None


def file_digest(path: str) -> str:
    """SHA-256 of ``path``'s bytes (the first 16 hex digits), cached by real path, size and mtime."""
    global _cache
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    if _cache is None:
        try:
            with open(CACHE, encoding="utf-8") as f:
                _cache = json.load(f)
        except (OSError, json.JSONDecodeError):
            _cache = {}
    if key not in _cache:
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _cache[key] = digest.hexdigest()[:16]
        try:
            os.makedirs(os.path.dirname(CACHE), exist_ok=True)
            with open(f"{CACHE}.tmp", "w", encoding="utf-8") as f:
                json.dump(_cache, f)
            os.replace(f"{CACHE}.tmp", CACHE)
        except OSError:
            pass  # a read-only home: digests are computed again next time
    return _cache[key]


def files_digest(paths: list[str]) -> str:
    """One digest of several files' contents, by name (not folder): the same files elsewhere agree."""
    parts = sorted((os.path.basename(p), file_digest(p)) for p in paths)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def weights_digest(llm_path: str) -> str:
    """Identity of the weights behind ``llm_path``: the digest of its weight files and config (a GGUF
    file alone), so the same weights at another path agree and other weights at the same path do
    not; a hub id not on this machine is its name."""
    from recbole_llmgen.llm import looks_like_path, resolve_llm_path

    try:
        source = resolve_llm_path(llm_path)
    except (FileNotFoundError, ValueError):  # the row fails with the named error (offline: a hub id not cached)
        return f"missing:{llm_path}" if looks_like_path(str(llm_path)) else f"hub:{llm_path}"
    if source.is_hub_id and not os.path.isdir(source.folder):
        return f"hub:{llm_path}"
    if source.gguf_file:
        return files_digest([os.path.join(source.folder, source.gguf_file)])
    names = [n for n in os.listdir(source.folder) if n.endswith(WEIGHT_SUFFIXES) or n == "config.json"]
    return files_digest([os.path.join(source.folder, n) for n in names])

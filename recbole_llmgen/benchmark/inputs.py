"""What a row read, by content: the dataset's files, the LLM's weights, the versions of the code.

A row is reused only while these are unchanged (they are part of its run hash and recorded in the
row): re-converted data, swapped weights behind the same ``llm_path`` or another release of
recbole-llmgen or RecBole rerun it. A file's digest (SHA-256 of its bytes) is cached by its real path,
size and modification time in ``~/.cache/recbole_llmgen/digests.json``, so an unchanged file is read
once, not at every run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os

from recbole_llmgen.benchmark.plan import file_settings

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


def dataset_digest(folder: str, dataset: str) -> str | None:
    """Digest of the dataset's atomic files (``DATASET.inter``, ``.item``, ``.user``, split files...)
    in ``folder``; None when the folder holds none (RecBole then fails on its own)."""
    if not os.path.isdir(folder):
        return None
    names = [n for n in os.listdir(folder) if n.startswith(f"{dataset}.")]
    paths = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    return files_digest(paths) if paths else None


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


def versions() -> dict[str, str]:
    """The releases whose code a row ran."""
    found = {}
    for package in ("recbole-llmgen", "recbole", "torch", "transformers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def row_inputs(spec: dict, data_folder: str | None, default_llm_path: str) -> dict:
    """What ``spec``'s row reads: the dataset's files, the code's versions and, for LLMGen rows (the
    text retriever included), the LLM's weights."""
    found = {"data": dataset_digest(data_folder, spec["dataset"]) if data_folder else None, "versions": versions()}
    feedback = spec["config"].get("feedback")
    if feedback is None:  # a config file's value (the last file's wins, as in RecBole)
        for path in spec.get("config_files") or []:
            feedback = file_settings(path, spec["model"]).get("feedback", feedback)
    if feedback:  # the chat feedback trained on (recbole_llmgen.feedback): its contents, not its name
        found["feedback"] = files_digest([feedback] if isinstance(feedback, str) else list(feedback))
    if spec["model"] == "LLMGen":
        found["llm_weights"] = weights_digest(spec["config"].get("llm_path") or default_llm_path)
    return found

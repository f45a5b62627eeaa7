"""What a row read, by content: the dataset's files, the LLM's weights, the versions of the code.

A row is reused only while these are unchanged (they are part of its run hash and recorded in the
row): re-converted data, swapped weights behind the same ``llm_path`` or another release of
recbole-llmgen or RecBole rerun it. A file's digest (SHA-256 of its bytes) is cached by its real path,
size and modification time in ``~/.cache/recbole_llmgen/digests.json``, so an unchanged file is read
once, not at every run.
"""

from __future__ import annotations

import importlib.metadata
import os

from recbole_llmgen.benchmark.plan import file_settings
from recbole_llmgen.digests import files_digest, weights_digest


def dataset_digest(folder: str, dataset: str) -> str | None:
    """Digest of the dataset's atomic files (``DATASET.inter``, ``.item``, ``.user``, split files...)
    in ``folder``; None when the folder holds none (RecBole then fails on its own)."""
    if not os.path.isdir(folder):
        return None
    names = [n for n in os.listdir(folder) if n.startswith(f"{dataset}.")]
    paths = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    return files_digest(paths) if paths else None


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

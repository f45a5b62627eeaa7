"""A finished row is reused while everything that defines its run is unchanged: the run hash, and
the row records written atomically beside it (``OUT/runs/<model>.json``)."""

from __future__ import annotations

import hashlib
import json
import os

from recbole_llmgen.benchmark.plan import file_settings
from recbole_llmgen.digests import file_digest


def run_hash(spec: dict) -> str:
    """Everything that defines a run: model, dataset, config dict, config files' text, the candidate
    model file's contents, and what the row reads (``spec['inputs']``: :func:`inputs.row_inputs`)."""
    # a file that sets nothing for this model (a section for another one) is no part of its run
    files = [s for s in (file_settings(path, spec["model"]) for path in spec.get("config_files") or []) if s]
    candidate = spec["config"].get("candidate_source")
    stamp = file_digest(candidate) if isinstance(candidate, str) and os.path.isfile(candidate) else None
    parts = [spec["model"], spec["dataset"], spec["config"], files, stamp, spec.get("llm_valid", False)]
    if spec.get("inputs"):  # the data's, the weights' and the code's identity (benchmark.inputs)
        parts.append(spec["inputs"])
    if spec.get("name"):  # a row of its own built from another model (the text retriever)
        parts.append(spec["name"])
    if spec.get("eval_users"):  # another sample of users is another run (its rows are never reused)
        parts.append(spec["eval_users"])
    if spec.get("nproc", 1) > 1:  # same metrics, other times: a rerun with another nproc is a new row
        parts.append(spec["nproc"])
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def read_record(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def write_record(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)

"""Entry points that run LLMGen and RecBole's built-in models the same way."""

from __future__ import annotations

import os

from recbole_llmgen.integration import with_data_path


def run_recbole(
    model=None,
    dataset=None,
    config_file_list=None,
    config_dict=None,
    saved=True,
    nproc=1,
    world_size=-1,
    ip="localhost",
    port="5678",
    group_offset=0,
):
    """RecBole's ``run_recbole`` (or, with ``nproc``/``world_size``, its multi-process ``run``)
    with the plugin registered; same arguments and return value.

    Works for LLMGen and for every built-in model, so one entry point serves a comparison.
    Datasets other than the bundled ml-100k are read from ``datasets/`` unless ``data_path``
    is set. ``nproc`` processes on this machine (gloo on CPUs, NCCL with one GPU each), ranks
    ``group_offset`` .. ``group_offset + nproc - 1`` of ``world_size`` (default ``nproc``) meeting at
    ``ip:port``; metrics equal a one-process run (see ``recbole_llmgen.distributed``).
    """
    import recbole.quick_start

    config_dict = with_data_path(dict(config_dict or {}), config_file_list)
    if model is not None and not isinstance(model, str):
        raise TypeError(f"model: expected a model name, got {model!r}")
    if model is not None:
        from recbole.utils import get_model

        get_model(model)  # a named error listing known models, before any data is read
    if config_file_list:
        for path in config_file_list:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config_files: {path!r} does not exist")
    nproc, world_size, group_offset = _processes(nproc, world_size, group_offset)
    if nproc == 1 and world_size == 1:
        return recbole.quick_start.run_recbole(
            model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict, saved=saved
        )
    from recbole_llmgen import distributed

    return distributed.spawn_run(
        model, dataset, config_file_list, config_dict, saved, nproc, world_size, ip, port, group_offset
    )


def _processes(nproc, world_size, group_offset) -> tuple[int, int, int]:
    """Checked (nproc, world_size, group_offset); world_size -1 or 0 means nproc."""
    for key, value in (("nproc", nproc), ("world_size", world_size), ("group_offset", group_offset)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
    if nproc < 1:
        raise ValueError(f"nproc: expected at least 1 process, got {nproc}")
    world_size = nproc if world_size <= 0 else world_size
    if group_offset < 0 or group_offset + nproc > world_size:
        raise ValueError(
            f"group_offset: ranks {group_offset}..{group_offset + nproc - 1} of this machine must lie in "
            f"0..{world_size - 1} (world_size {world_size}, nproc {nproc})"
        )
    return nproc, world_size, group_offset

"""RecBole's multi-process mode (``nproc``, ``world_size``, ``ip``, ``port``, ``group_offset``),
made to work for LLMGen and every built-in model, on CPUs (gloo) and GPUs (NCCL).

RecBole 1.2.1's own multi-process mode has six defects; :func:`install` replaces the few RecBole
functions involved (once, idempotent). A single-process run (``single_spec``) takes RecBole's own
code path unchanged.

1. Backend: RecBole hard-codes NCCL and ``cuda:<local_rank>``. Here: NCCL with one GPU per rank when
   CUDA is there and ``use_gpu`` is on, else gloo on the CPU (:func:`_init_device`).
2. Evaluation: RecBole shards users with a padding ``DistributedSampler`` (up to world_size - 1 users
   counted twice) and averages per-rank metrics. Here every rank walks the same evaluation batches
   as a single process (same batches, same negative samples: the random state is rank 0's), scores
   only every world_size-th batch, and the per-user rows the evaluator needs are gathered back in
   the single-process order, so metrics equal a one-process run exactly (:func:`evaluate`).
3. Training: RecBole wraps every model in ``DistributedDataParallel`` (which raises when nothing is
   trainable, e.g. zero-shot LLMGen). Here DDP only when a parameter requires grad; LLMGen's module
   tree holds only its trainable tensors, so DDP never broadcasts or syncs frozen LLM weights.
4. Checkpoints: RecBole names the file from each rank's own clock. Here rank 0's name is the name
   on every rank, only global rank 0 writes it, the others wait for it, and a best model is loaded
   by rank 0 and sent to the others (no shared filesystem needed).
5. Folders: RecBole's ``ensure_dir`` checks, then creates: two ranks race and one crashes with
   FileExistsError. Here ``os.makedirs(exist_ok=True)``.
6. Spawned processes: RecBole's ``run`` spawns ``recbole.quick_start.run_recboles``, which never
   imports the plugin; :func:`spawn_run` spawns a target that does.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from recbole_llmgen.compat import replace
from recbole_llmgen.integration import load_checkpoint

_installed = False
_ROW_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label")


def active(config=None) -> bool:
    """Whether this process is one rank of a multi-process run."""
    if config is not None and config["single_spec"] is not None:
        return not config["single_spec"]
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def broadcast(value, src: int = 0):
    """``value`` as rank ``src`` holds it, on every rank (any picklable object)."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank_zero(function, *args, **kwargs):
    """Run ``function`` on global rank 0 only; the others wait for it and get its result.

    An error on rank 0 is raised on every rank (as a RuntimeError naming it), so no rank is left
    waiting for a file that was never written."""
    if not active():
        return function(*args, **kwargs)
    outcome, failure = (None, None), None
    if rank() == 0:
        try:
            outcome = (function(*args, **kwargs), None)
        except Exception as error:  # re-raised below; the others get its text (errors may not pickle)
            failure = error
            outcome = (None, f"{type(error).__name__}: {error}")
    result, message = broadcast(outcome)
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")
    return result


def share_random_state() -> None:
    """Every rank takes rank 0's Python, numpy and torch random state (same negative samples)."""
    state = broadcast((random.getstate(), np.random.get_state(), torch.get_rng_state()))
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


# ---------------------------------------------------------------- 1. backend and device


def _init_device(self):
    """RecBole's ``Config._init_device`` with gloo on CPUs and NCCL on GPUs."""
    cfg = self.final_config_dict
    if "local_rank" not in cfg:
        return _originals["init_device"](self)
    gpu_id = cfg["gpu_id"]
    gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, (tuple, list)) else str(gpu_id)
    cfg["gpu_id"] = gpu_id
    nproc = int(cfg.get("nproc") or 1)
    wants_gpu = bool(cfg.get("use_gpu", True)) and gpu_id != ""
    if wants_gpu:  # before CUDA is first touched in this process, as RecBole does
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
    use_cuda = wants_gpu and torch.cuda.is_available()
    if use_cuda and len([g for g in gpu_id.split(",") if g.strip() != ""]) < nproc:
        raise ValueError(
            f"nproc: {nproc} processes need {nproc} GPUs listed in gpu_id, got gpu_id: {gpu_id!r}; "
            f"list them (e.g. gpu_id: '{','.join(map(str, range(nproc)))}') or set use_gpu: False for CPU (gloo)"
        )
    local_rank = int(cfg["local_rank"])
    world_size = int(cfg["world_size"])
    global_rank = local_rank + int(cfg.get("offset") or 0)
    if not 0 <= global_rank < world_size:
        raise ValueError(
            f"group_offset: rank {global_rank} (local rank {local_rank} + group_offset {cfg.get('offset')}) "
            f"is outside world_size {world_size}; group_offset + nproc must be <= world_size"
        )
    if not dist.is_initialized():  # a second Config in the same rank (e.g. a candidate model) reuses it
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=global_rank,
            world_size=world_size,
            init_method=f"tcp://{cfg['ip']}:{cfg['port']}",
        )
    cfg["device"] = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    cfg["single_spec"] = False
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if local_rank != 0:
        cfg["state"] = "error"
        cfg["show_progress"] = False
        cfg["verbose"] = False


# ---------------------------------------------------------------- 2. evaluation


def _init_dataloader(self, config, dataset, sampler, shuffle=False):
    """Evaluation loaders are not sharded: every rank walks the single-process batches."""
    from recbole.data.dataloader.general_dataloader import FullSortEvalDataLoader, NegSampleEvalDataLoader

    if config["single_spec"] or not isinstance(self, (FullSortEvalDataLoader, NegSampleEvalDataLoader)):
        return _originals["dataloader_init"](self, config, dataset, sampler, shuffle)
    with _as_single_process(config):
        _originals["dataloader_init"](self, config, dataset, sampler, shuffle)


@contextlib.contextmanager
def _as_single_process(config) -> Iterator[None]:
    config.final_config_dict["single_spec"] = True
    try:
        yield
    finally:
        config.final_config_dict["single_spec"] = False


def _take_rows(collector) -> dict:
    """The per-user rows the collector gathered for one batch (removed from it)."""
    store = collector.data_struct._data_dict
    return {key: store.pop(key).cpu() for key in _ROW_KEYS if key in store}


def merge_rows(per_rank: list[list[tuple[int, dict]]]) -> dict:
    """Concatenate gathered ``(batch index, rows)`` in batch order: the single-process order.

    Each batch must occur once; a batch reported twice or missing is an error (it would count
    users twice or drop them)."""
    batches = sorted(((index, rows) for shard in per_rank for index, rows in shard), key=lambda batch: batch[0])
    indices = [index for index, _ in batches]
    if indices != list(range(len(indices))):
        raise RuntimeError(f"evaluation shards do not partition the batches: got batch indices {indices}")
    merged = {}
    for key in {k for _, rows in batches for k in rows}:
        merged[key] = torch.cat([rows[key] for _, rows in batches if key in rows], dim=0)
    return merged


def load_checkpoint_everywhere(path: str, device) -> dict:
    """Rank 0 reads the checkpoint (without optimizer state), every rank receives it."""

    def read():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist on rank 0")
        checkpoint = load_checkpoint(path)  # this run's own checkpoint
        checkpoint.pop("optimizer", None)
        return checkpoint

    checkpoint = on_rank_zero(read)
    checkpoint["state_dict"] = {
        k: v.to(device) if torch.is_tensor(v) else v for k, v in checkpoint["state_dict"].items()
    }
    return checkpoint


@torch.no_grad()
def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
    """RecBole's ``Trainer.evaluate``; in a multi-process run, sharded by batch and gathered."""
    if not active(self.config):
        return _originals["evaluate"](self, eval_data, load_best_model, model_file, show_progress)
    from recbole.data.dataloader import FullSortEvalDataLoader
    from recbole.utils import EvaluatorType, set_color
    from tqdm import tqdm

    if not eval_data:
        return
    if load_best_model:
        checkpoint_file = model_file or self.saved_model_file
        checkpoint = load_checkpoint_everywhere(checkpoint_file, self.device)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
    self.model.eval()
    if isinstance(eval_data, FullSortEvalDataLoader):
        eval_func = self._full_sort_batch_eval
        if self.item_tensor is None:
            self.item_tensor = eval_data._dataset.get_item_feature().to(self.device)
    else:
        eval_func = self._neg_sample_batch_eval
    if self.config["eval_type"] == EvaluatorType.RANKING:
        self.tot_item_num = eval_data._dataset.item_num

    share_random_state()  # the negative samples drawn while walking the batches are rank 0's
    me, world = dist.get_rank(), dist.get_world_size()
    iter_data = eval_data
    if show_progress:
        iter_data = tqdm(eval_data, total=len(eval_data), ncols=100, desc=set_color("Evaluate   ", "pink"))
    mine = []
    for index, batched_data in enumerate(iter_data):  # every rank collates every batch (same random draws)
        if index % world != me:
            continue
        interaction, scores, positive_u, positive_i = eval_func(batched_data)
        self.eval_collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
        mine.append((index, _take_rows(self.eval_collector)))
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    for key, value in merge_rows(gathered).items():
        self.eval_collector.data_struct.set(key, value)
    self.eval_collector.model_collect(self.model)
    struct = self.eval_collector.get_data_struct()
    result = self.evaluator.evaluate(struct)
    self.wandblogger.log_eval_metrics(result, head="eval")
    return result


# ---------------------------------------------------------------- 3-4. trainer: DDP and checkpoints


def wrap_trainable(model, config):
    """``DistributedDataParallel`` over the model's trainable parameters, or None when it has none.

    LLMGen's module tree holds only its trainable tensors (the frozen LLM is outside it), so DDP
    neither broadcasts nor all-reduces a frozen weight."""
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in model.parameters()):
        return None
    if config["device"].type == "cuda":
        return DistributedDataParallel(model, device_ids=[config["device"].index])
    return DistributedDataParallel(model)


def _init_trainer(self, config, model):
    """RecBole's ``Trainer.__init__`` with an agreed checkpoint name and DDP only when trainable."""
    if not active(config):
        return _originals["trainer_init"](self, config, model)
    with _as_single_process(config):  # skip RecBole's NCCL-only, always-on DDP wrap
        _originals["trainer_init"](self, config, model)
    if config["device"].type == "cuda":
        self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
    self.saved_model_file = broadcast(self.saved_model_file)  # rank 0's clock names the file
    self.distributed_model = wrap_trainable(self.model, config)


def save_on_rank_zero(config, write, *args, **kwargs) -> None:
    """``write(*args, **kwargs)`` on global rank 0 only, the others wait for it (RecBole's own check
    is per node). The config it pickles says ``single_spec: True``, so ``load_data_and_model`` and
    ``checkpoint:`` read the file in one process."""
    if not active(config):
        return write(*args, **kwargs)

    def single_process_write():
        with _as_single_process(config):
            return write(*args, **kwargs)

    return on_rank_zero(single_process_write)


def _save_checkpoint(self, epoch, verbose=True, **kwargs):
    save_on_rank_zero(self.config, _originals["save_checkpoint"], self, epoch, verbose=verbose, **kwargs)


def sync_gradients_next_backward(trainer) -> torch.Tensor | int:
    """Arm DDP's all-reduce for the next backward pass; returns a zero to add to that loss so every
    trainable parameter takes part (RecBole's own pattern). 0 when not distributed."""
    if getattr(trainer, "distributed_model", None) is None:  # set only by a multi-process trainer
        return 0
    trainer.set_reduce_hook()
    return trainer.sync_grad_loss()


def ensure_dir(dir_path) -> None:
    """RecBole's ``ensure_dir`` without its check-then-create race between ranks."""
    os.makedirs(dir_path, exist_ok=True)


def _replace_ensure_dir() -> None:
    import sys

    import recbole.data.dataset.dataset  # noqa: F401  (every RecBole module that imports ensure_dir)
    import recbole.data.utils  # noqa: F401
    import recbole.utils.logger  # noqa: F401
    from recbole.utils import utils

    original = utils.ensure_dir
    for name, module in list(sys.modules.items()):
        if name.startswith("recbole") and getattr(module, "ensure_dir", None) is original:
            replace(module, "ensure_dir", ensure_dir)


_originals: dict = {}


def install() -> None:
    """Replace RecBole's multi-process pieces (see the module docstring). Idempotent."""
    global _installed
    if _installed:
        return
    from recbole.config import Config
    from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader
    from recbole.trainer import trainer

    _originals.update(
        init_device=Config._init_device,
        dataloader_init=AbstractDataLoader.__init__,
        evaluate=trainer.Trainer.evaluate,
        trainer_init=trainer.Trainer.__init__,
        save_checkpoint=trainer.Trainer._save_checkpoint,
    )
    replace(Config, "_init_device", _init_device)
    replace(AbstractDataLoader, "__init__", _init_dataloader)
    replace(trainer.Trainer, "evaluate", evaluate)
    replace(trainer.Trainer, "__init__", _init_trainer)
    replace(trainer.Trainer, "_save_checkpoint", _save_checkpoint)
    _replace_ensure_dir()
    _installed = True


# ---------------------------------------------------------------- 5. launching


def free_port() -> str:
    """A TCP port free on this machine now (for a one-machine run)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


def rank_config(
    config_dict: dict,
    local_rank: int,
    nproc: int,
    port: str,
    world_size: int | None = None,
    ip: str = "localhost",
    group_offset: int = 0,
) -> dict:
    """``config_dict`` for rank ``local_rank`` of ``nproc`` on this machine (ranks ``group_offset`` ..
    of ``world_size``, default ``nproc``, meeting at ``ip:port``): the keys RecBole's Config reads."""
    return {
        **config_dict,
        "local_rank": local_rank,
        "world_size": world_size or nproc,
        "nproc": nproc,
        "ip": ip,
        "port": str(port),
        "offset": group_offset,
    }


def share_cpus(nproc: int) -> None:
    """Give this rank its share of the machine's cores (``nproc`` ranks), unless OMP_NUM_THREADS says."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, nproc)))


def exit_with_parent(every_s: float = 2.0) -> None:
    """End this process when the one that started it is gone (killed, not only interrupted): a
    spawned rank must not train on for an hour, holding the cores, after its benchmark was stopped."""
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _spawned(local_rank, model, dataset, config_file_list, config_dict, saved, queue):
    """Entry point of one spawned rank: imports the plugin, then RecBole's run_recbole."""
    from recbole.quick_start import quick_start

    exit_with_parent()

    import recbole_llmgen  # noqa: F401  (registers LLMGen and installs the fixes in this process)
    from recbole_llmgen.integration import recbole_argv

    share_cpus(int(config_dict["nproc"]))
    with recbole_argv():
        quick_start.run_recbole(
            model=model,
            dataset=dataset,
            config_file_list=config_file_list,
            config_dict={**config_dict, "local_rank": local_rank},
            saved=saved,
            queue=queue,
        )


def spawn_run(model, dataset, config_file_list, config_dict, saved, nproc, world_size, ip, port, group_offset):
    """``nproc`` ranks on this machine (ranks group_offset .. group_offset + nproc - 1 of
    world_size); returns the result of this machine's first rank."""
    import torch.multiprocessing as mp

    config_dict = rank_config(config_dict, 0, nproc, port, world_size, ip, group_offset)  # local_rank: per rank
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_spawned, args=(model, dataset, config_file_list, config_dict, saved, queue), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()

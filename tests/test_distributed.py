"""Multi-process runs (RecBole's nproc/world_size mode) on CPU with gloo: two real processes."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import write_toy_dataset

from recbole_llmgen.distributed import free_port


@pytest.fixture
def odd_config(tmp_path, tiny_llm_path, cache_dir) -> dict:
    """7 users (odd: a padding sampler would count one twice), batches of 3 users (uneven shards)."""
    root = write_toy_dataset(tmp_path / "datasets", n_users=7)
    return {
        "data_path": str(root),
        "llm_path": tiny_llm_path,
        "llm_cache_dir": str(cache_dir),
        "num_candidates": 5,
        "show_progress": False,
        "eval_batch_size": 3,
        "log_wandb": False,
        "state": "ERROR",
        "metrics": ["Recall", "NDCG", "Hit", "MRR", "Precision"],
        "topk": [1, 3, 10],
        "checkpoint_dir": str(tmp_path / "saved"),
    }


def _run(config: dict, nproc: int, model: str = "LLMGen", saved: bool = False):
    from recbole_llmgen import run_recbole

    return run_recbole(model=model, dataset="toy", config_dict=dict(config), saved=saved, nproc=nproc, port=free_port())


@pytest.mark.parametrize("protocol", ["full", "uni19"])
def test_two_processes_give_the_one_process_metrics_exactly(odd_config, protocol):
    config = dict(odd_config, eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "mode": protocol})
    one = _run(config, 1)
    two = _run(config, 2)
    assert two["test_result"] == one["test_result"]
    assert two["best_valid_result"] == one["best_valid_result"]
    assert 0 < one["test_result"]["hit@10"]  # not a vacuous equality


@pytest.mark.parametrize("model", ["BPR", "SASRec"])
def test_builtin_model_trains_on_two_processes(odd_config, tmp_path, model):
    from recbole.quick_start import load_data_and_model

    from recbole_llmgen.integration import recbole_argv

    config = dict(odd_config, epochs=2, train_batch_size=8, load_col=None)
    config["eval_args"] = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}
    if model == "SASRec":
        config.update(train_neg_sample_args=None, hidden_size=16, inner_size=32, n_layers=1, n_heads=1)
    result = _run(config, 2, model=model, saved=True)
    assert set(result["test_result"]) >= {"ndcg@10", "hit@10"}
    (checkpoint,) = list((tmp_path / "saved").glob(f"{model}-*.pth"))  # one file, written by rank 0
    with recbole_argv():
        loaded_config, loaded, _, _, _, test_data = load_data_and_model(str(checkpoint))
    assert type(loaded).__name__ == model
    # the file holds the trained weights: one process evaluating it gets the 2-process test metrics
    from recbole.utils import get_trainer

    trainer = get_trainer(loaded_config["MODEL_TYPE"], model)(loaded_config, loaded)
    assert trainer.evaluate(test_data, load_best_model=False) == result["test_result"]


def test_merge_rows_restores_batch_order_and_refuses_gaps_or_repeats():
    from recbole_llmgen.distributed import merge_rows

    def rows(*values):
        return {"rec.topk": torch.tensor([[v] for v in values])}

    merged = merge_rows([[(0, rows(1, 2)), (2, rows(5))], [(1, rows(3, 4))]])
    assert merged["rec.topk"].flatten().tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError, match="partition"):
        merge_rows([[(0, rows(1, 2))], [(0, rows(3, 4))]])  # a batch counted twice
    with pytest.raises(RuntimeError, match="partition"):
        merge_rows([[(0, rows(1))], [(2, rows(1))]])  # batch 1 missing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nproc": 0}, "nproc: expected at least 1"),
        ({"nproc": "2"}, "nproc: expected an integer"),
        ({"nproc": 2, "world_size": 4, "group_offset": 3}, "group_offset: ranks 3..4"),
    ],
)
def test_bad_process_settings_are_named(kwargs, message):
    from recbole_llmgen import run_recbole

    with pytest.raises(ValueError, match=message):
        run_recbole(model="BPR", dataset="ml-100k", **kwargs)


def test_cli_takes_nproc(odd_config, tmp_path, capsys):
    import json

    from recbole_llmgen.cli import main

    out = tmp_path / "run.json"
    args = ["run", "--model", "LLMGen", "--dataset", "toy", "--nproc", "2", "--port", free_port(), "--no-save"]
    args += [f"--{k}={json.dumps(v)}" for k, v in odd_config.items()]
    assert main([*args, "--json", str(out)]) == 0
    one = tmp_path / "one.json"  # the same run in one process: the same metrics
    assert main([*[a for a in args if a not in ("--nproc", "2")], "--json", str(one)]) == 0
    assert json.loads(out.read_text())["test_result"] == json.loads(one.read_text())["test_result"]


# --------------------------------------------------------------------------- one rank, inspected


def _rank_main(local_rank: int, config_dict: dict, port: str, out_dir: str) -> None:
    """One rank of a hand-launched 2-process run: trains, evaluates, reports what it holds."""
    import recbole.trainer.trainer as recbole_trainer
    import torch.distributed as dist
    from recbole.config import Config
    from recbole.utils import get_model, get_trainer, init_seed

    from recbole_llmgen.distributed import rank_config
    from recbole_llmgen.integration import load_data, recbole_argv

    torch.set_num_threads(1)
    recbole_trainer.get_local_time = lambda: f"clock-of-rank-{local_rank}"  # ranks disagree on the time
    with recbole_argv():
        config = Config(model="LLMGen", dataset="toy", config_dict=rank_config(config_dict, local_rank, 2, port))
    train_data, valid_data, test_data = load_data(config)
    init_seed(config["seed"] + local_rank, config["reproducibility"])  # as RecBole: ranks start different
    model = get_model("LLMGen")(config, train_data._dataset)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    trainer = get_trainer(config["MODEL_TYPE"], "LLMGen")(config, model)
    ddp = trainer.distributed_model
    report = {
        "backend": dist.get_backend(),
        "device": str(config["device"]),
        "ddp": ddp is not None,
        "ddp_numel": sum(p.numel() for p in ddp.module.parameters()) if ddp is not None else 0,
        "trainable_numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "initial": initial,
        "after_wrap": {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)},
        "saved_model_file": trainer.saved_model_file,
        "use_reentrant": {  # how each checkpointed layer recomputes (HF keeps the kwargs it was given)
            m._gradient_checkpointing_func.keywords.get("use_reentrant")
            for m in model.llm.modules()
            if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")
        },
    }
    trainer.fit(train_data, valid_data, saved=True)
    report["trained"] = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    report["fusion_weight"] = model.fusion_weight
    report["test_result"] = dict(trainer.evaluate(test_data, load_best_model=True))
    interaction = next(iter(test_data))[0]
    report["users"] = interaction["user_id"].tolist()
    report["scores"] = model.full_sort_predict(interaction).detach()
    torch.save(report, os.path.join(out_dir, f"rank{local_rank}.pt"))
    dist.destroy_process_group()


def _launch(config: dict, tmp_path) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(config, free_port(), str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


SEQUENCE = {"prompt_format": "list", "llm_train_objective": "sequence", "max_history_items": 3, "score_fusion": "auto"}


@pytest.mark.parametrize(("train_mode", "extra"), [("lora", {}), ("full", {}), ("lora", SEQUENCE)])
def test_training_on_two_ranks_syncs_weights_and_writes_one_agreed_checkpoint(odd_config, tmp_path, train_mode, extra):
    config = dict(
        odd_config,
        **extra,
        train_mode=train_mode,
        epochs=1,
        train_batch_size=4,  # 2 rows per rank per step, in micro-batches of 1: accumulation + one all-reduce
        llm_train_batch_size=1,
        llm_train_examples_per_user=2,
        gradient_checkpointing=True,  # non-reentrant: works under DDP
        learning_rate=0.05 if train_mode == "lora" else 0.001,
    )
    zero, one = _launch(config, tmp_path)
    assert zero["use_reentrant"] == {False}
    assert zero["backend"] == one["backend"] == "gloo" and zero["device"] == "cpu"
    # DDP holds only the trainable weights: no frozen base weight is broadcast or all-reduced
    assert zero["ddp"] and zero["ddp_numel"] == zero["trainable_numel"] > 0
    keys = [k for k in zero["trained"] if k != "_extra_state"]
    assert keys and (train_mode == "full" or all("lora" in k for k in keys))
    if train_mode == "lora":
        assert any(not torch.equal(zero["initial"][k], one["initial"][k]) for k in keys)  # seeds differ per rank
    for k in keys:
        assert torch.equal(zero["after_wrap"][k], one["after_wrap"][k]), k  # DDP sent rank 0's to all
    for k in keys:
        assert torch.equal(zero["trained"][k], one["trained"][k]), k  # same adapters after every step
    assert any(not torch.equal(zero["trained"][k], zero["initial"][k]) for k in keys)  # it trained
    # one checkpoint, at rank 0's name, on both ranks; it loads, and gives the same scores everywhere
    assert zero["saved_model_file"] == one["saved_model_file"]
    assert zero["saved_model_file"].endswith("LLMGen-clock-of-rank-0.pth")
    assert [p.name for p in (tmp_path / "saved").glob("*.pth")] == ["LLMGen-clock-of-rank-0.pth"]
    assert zero["test_result"] == one["test_result"]
    assert zero["users"] == one["users"] and torch.equal(zero["scores"], one["scores"])
    assert zero["fusion_weight"] == one["fusion_weight"]  # score_fusion: auto chose one weight for all ranks
    assert (zero["fusion_weight"] is not None) == ("score_fusion" in extra)

    from recbole.quick_start import load_data_and_model

    from recbole_llmgen.integration import recbole_argv

    with recbole_argv():
        _, model, _, _, _, test_data = load_data_and_model(zero["saved_model_file"])
    for k in keys:
        assert torch.equal(model.state_dict()[k], zero["trained"][k])
    interaction = next(iter(test_data))[0]
    model.eval()  # as evaluation scores (LoRA merged into the weights)
    assert torch.allclose(model.full_sort_predict(interaction), zero["scores"], atol=1e-5)


def test_zero_shot_on_two_ranks_needs_no_ddp(odd_config, tmp_path):
    zero, one = _launch(odd_config, tmp_path)
    assert not zero["ddp"] and not one["ddp"] and zero["trainable_numel"] == 0
    assert zero["test_result"] == one["test_result"]
    assert zero["saved_model_file"] == one["saved_model_file"]


def test_two_machines_with_group_offset_give_the_one_process_metrics(odd_config, tmp_path):
    """world_size 2 as two separate launches of one process each (what two machines run)."""
    import json
    import subprocess
    import sys

    config = dict(odd_config, eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"})
    one = _run(config, 1)
    port = free_port()
    overrides = [f"--{k}={json.dumps(v)}" for k, v in config.items()]
    launches = []
    for offset in (0, 1):
        command = [sys.executable, "-m", "recbole_llmgen", "run", "--model", "LLMGen", "--dataset", "toy"]
        command += ["--nproc", "1", "--world_size", "2", "--group_offset", str(offset), "--port", port, "--no-save"]
        command += [*overrides, "--json", str(tmp_path / f"machine{offset}.json")]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        launches.append(
            subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    for launch in launches:
        output = launch.communicate(timeout=300)[0].decode(errors="replace")
        assert launch.returncode == 0, output[-3000:]
    for offset in (0, 1):
        summary = json.loads((tmp_path / f"machine{offset}.json").read_text())
        assert summary["test_result"] == {k: float(v) for k, v in one["test_result"].items()}


def test_too_few_gpus_for_nproc_is_named(odd_config, monkeypatch):
    from recbole.config import Config

    from recbole_llmgen.integration import recbole_argv

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # restored afterwards (the check sets it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # checked before any process group or GPU call
    config = dict(odd_config, local_rank=0, nproc=2, world_size=2, ip="localhost", port=free_port(), offset=0)
    with (
        recbole_argv(),
        pytest.raises(ValueError, match="nproc: 2 processes need 2 GPUs listed in gpu_id, got gpu_id: '0'"),
    ):
        Config(model="LLMGen", dataset="toy", config_dict=dict(config, gpu_id="0"))


def _failing_rank(local_rank: int, port: str, out_dir: str) -> None:
    import torch.distributed as dist

    from recbole_llmgen import distributed

    dist.init_process_group("gloo", rank=local_rank, world_size=2, init_method=f"tcp://localhost:{port}")

    def write():
        raise OSError("disk full")

    try:
        distributed.on_rank_zero(write)
        message = "no error"
    except Exception as error:  # what each rank sees
        message = f"{type(error).__name__}: {error}"
    with open(os.path.join(out_dir, f"rank{local_rank}.txt"), "w") as f:
        f.write(message)
    dist.destroy_process_group()


def test_an_error_writing_on_rank_zero_reaches_every_rank(tmp_path):
    """No rank is left waiting for a checkpoint that rank 0 failed to write."""
    import torch.multiprocessing as mp

    mp.spawn(_failing_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.txt").read_text() == "OSError: disk full"
    assert (tmp_path / "rank1.txt").read_text() == "RuntimeError: rank 0 failed: OSError: disk full"


def test_a_rank_ends_when_the_process_that_started_it_is_killed(tmp_path):
    """A killed benchmark leaves no rank behind holding the cores (it trained on for 28 minutes)."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing as mp, sys, time\n"
        "def rank():\n"
        "    from recbole_llmgen.distributed import exit_with_parent\n"
        "    exit_with_parent(every_s=0.2)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    child = mp.get_context('spawn').Process(target=rank)\n"
        "    child.start()\n"
        "    print(child.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "ready"  # the rank watches its parent
    os.kill(child, 0)  # alive while its parent is
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return  # gone (reaped by init)
        if open(f"/proc/{child}/stat").read().split()[2] == "Z":
            return  # exited, not yet reaped
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the rank outlived its killed parent by 60 s")

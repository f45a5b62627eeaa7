"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and a toy dataset."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# RecBole parses --key=value from sys.argv on every Config: keep pytest's arguments away from it.
sys.argv = sys.argv[:1]

import recbole_llmgen  # noqa: E402,F401  (registers LLMGen)

N_USERS, N_ITEMS, PER_USER = 8, 30, 12


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """Run each test in its own folder (RecBole writes log/ and saved/) with a clean argv."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One GGUF de-quantization cache for the whole session."""
    path = Path(os.environ.get("RECBOLE_LLMGEN_TEST_CACHE", tmp_path_factory.mktemp("llm_cache")))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from recbole_llmgen.llm import BUNDLED, package_folder

    package, file_name = BUNDLED["smollm2"]
    return AutoTokenizer.from_pretrained(str(package_folder(package)), gguf_file=file_name)


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory, tokenizer) -> str:
    """A randomly initialised 2-layer Llama with SmolLM2's real tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.5,  # large weights: distinct, position-sensitive log-probs
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llm_path):
    from recbole_llmgen.llm import load_llm

    return load_llm(tiny_llm_path, llm_dtype="float32")


def write_toy_dataset(root: Path, name: str = "toy", titles: list[str] | None = None, n_users: int = N_USERS) -> Path:
    """8 users (or ``n_users``) x 12 interactions over 30 items with distinct titles and years."""
    import random

    rng = random.Random(7)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    titles = titles or [f"Movie {chr(65 + i % 26)}{i} Story" for i in range(N_ITEMS)]
    with open(folder / f"{name}.item", "w", encoding="utf-8") as f:
        f.write("item_id:token\ttitle:token_seq\tyear:token\n")
        for i, title in enumerate(titles):
            f.write(f"i{i}\t{title}\t{1980 + i}\n")
    with open(folder / f"{name}.inter", "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u in range(n_users):
            items = rng.sample(range(N_ITEMS), PER_USER)
            for t, i in enumerate(items):
                f.write(f"u{u}\ti{i}\t{rng.randint(1, 5)}\t{1000 * u + t}\n")
    return root


@pytest.fixture
def toy_root(tmp_path) -> Path:
    return write_toy_dataset(tmp_path / "datasets")


@pytest.fixture
def toy_config_dict(toy_root, tiny_llm_path, cache_dir) -> dict:
    return {
        "data_path": str(toy_root),
        "llm_path": tiny_llm_path,
        "llm_cache_dir": str(cache_dir),
        "llm_dtype": "float32",  # exact comparisons; the bf16 path has its own tests
        "num_candidates": 5,
        "show_progress": False,
        "eval_batch_size": 4,
        "log_wandb": False,
        "state": "ERROR",
    }


def bench_overrides(toy_config_dict: dict, **extra) -> dict:
    """Benchmark overrides for the toy data and tiny LLM: one epoch, small classic models."""
    return {
        "data_path": toy_config_dict["data_path"],
        "llm_path": toy_config_dict["llm_path"],
        "llm_cache_dir": toy_config_dict["llm_cache_dir"],
        "num_candidates": 5,
        "epochs": 1,
        "hidden_size": 16,
        "inner_size": 32,
        "embedding_size": 16,
        "state": "ERROR",
        **extra,
    }


def build(config_dict: dict, dataset: str = "toy", model: str = "LLMGen"):
    """Config, loaders and model, the way RecBole's run_recbole builds them."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, init_seed

    config = Config(model=model, dataset=dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    data = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, data)
    model_obj = get_model(config["model"])(config, train_data._dataset)
    return config, model_obj, train_data, valid_data, test_data


def train_steps(model, batch, steps: int, seed: int | None = None) -> list[float]:
    """Losses of ``steps`` Adam steps (lr 1e-2) on one batch; ``seed`` reset before each step
    (the same random choices every step, e.g. verbalizer candidate lists)."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        if seed is not None:
            torch.manual_seed(seed)
        optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def record_evaluations(trainer, value) -> list:
    """Wraps ``trainer.evaluate``: each call appends (the data it evaluated, ``value()`` then) to the
    returned list (what a grid on the valid split tried, and on which split)."""
    evaluated, original = [], trainer.evaluate
    trainer.evaluate = lambda data, *a, **kw: evaluated.append((data, value())) or original(data, *a, **kw)
    return evaluated


def ranking_metrics(scores, targets, masked) -> dict:
    """NDCG@10 and Hit@10 by their definitions (not RecBole's metric code): row ``b`` ranks every
    item by ``scores[b]`` without the padding item and the items ``masked[b]``; its target is
    ``targets[b]``. Rounded as RecBole reports them."""
    import math

    ndcg = hit = 0.0
    for b, target in enumerate(targets):
        row = scores[b].clone()
        row[0] = -math.inf
        row[list(masked[b])] = -math.inf
        rank = int((row > row[target]).sum())
        if rank < 10:
            hit += 1
            ndcg += 1 / math.log2(rank + 2)
    return {"ndcg@10": round(ndcg / len(targets), 4), "hit@10": round(hit / len(targets), 4)}


def hand_metrics(model, data) -> dict:
    """:func:`ranking_metrics` of a full-ranking loader: ``model.full_sort_predict`` scores, the
    loader's masked items and its positives (one per row: leave-one-out), over all its batches."""
    import torch

    model.eval()
    scores, targets, masked = [], [], []
    for interaction, history_index, positive_u, positive_i in data:
        with torch.no_grad():
            batch = model.full_sort_predict(interaction).view(len(interaction), -1)
        hidden = [[] for _ in range(len(batch))]
        if history_index is not None:
            for row, item in zip(*(t.tolist() for t in history_index)):
                hidden[row].append(item)
        for row, item in zip(positive_u.tolist(), positive_i.tolist()):
            scores.append(batch[row])
            targets.append(item)
            masked.append(hidden[row])
    return ranking_metrics(scores, targets, masked)


def sampled_metrics(model, data) -> dict:
    """:func:`ranking_metrics` of a sampled loader (uni19, uni100): ``model.predict`` of each row
    (a user's target and its sampled items); every other item ranks below them all."""
    import math

    import torch

    model.eval()
    scores, targets = [], []
    for interaction, row_idx, positive_u, positive_i in data:
        with torch.no_grad():
            predicted = model.predict(interaction).view(-1)
        batch = torch.full((int(positive_u[-1]) + 1, data._dataset.item_num), -math.inf)
        batch[row_idx, interaction[data._dataset.iid_field]] = predicted.float()
        for row, item in zip(positive_u.tolist(), positive_i.tolist()):
            scores.append(batch[row])
            targets.append(item)
    return ranking_metrics(scores, targets, [[] for _ in targets])

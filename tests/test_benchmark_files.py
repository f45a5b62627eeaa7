"""LLMGen on RecBole's pre-split benchmark files whose rows carry the history as item_id_list."""

import math

import torch
from conftest import build


def write_presplit(root, name="presplit"):
    folder = root / name
    folder.mkdir(parents=True)
    titles = {f"i{i}": f"Film {chr(65 + i)} Title" for i in range(12)}
    with open(folder / f"{name}.item", "w") as f:
        f.write("item_id:token\ttitle:token_seq\n")
        for item, title in titles.items():
            f.write(f"{item}\t{title}\n")
    sequences = {f"u{u}": [f"i{(u * 3 + k) % 12}" for k in range(7)] for u in range(6)}
    splits = {"train": [], "valid": [], "test": []}
    for user, seq in sequences.items():
        for t in range(1, 5):
            splits["train"].append((user, seq[:t], seq[t]))
        splits["valid"].append((user, seq[:5], seq[5]))
        splits["test"].append((user, seq[:6], seq[6]))
    for split, rows in splits.items():
        with open(folder / f"{name}.{split}.inter", "w") as f:
            f.write("user_id:token\titem_id_list:token_seq\titem_id:token\n")
            for user, history, target in rows:
                f.write(f"{user}\t{' '.join(history)}\t{target}\n")
    return sequences


def test_history_comes_from_item_id_list(tmp_path, tiny_llm_path, cache_dir):
    """No extra config: LLMGen maps item_id_list into the item id space (alias_of_item_id) itself."""
    sequences = write_presplit(tmp_path / "datasets")
    config = {
        "data_path": str(tmp_path / "datasets"),
        "benchmark_filename": ["train", "valid", "test"],
        "llm_path": tiny_llm_path,
        "num_candidates": 3,
        "show_progress": False,
        "state": "ERROR",
    }
    _, model, train_data, _, test_data = build(config, dataset="presplit")
    dataset = train_data._dataset
    batch = next(iter(test_data))[0]
    for row in range(len(batch)):
        user = dataset.id2token("user_id", int(batch["user_id"][row]))
        history = batch[model.ITEM_SEQ][row, : batch[model.ITEM_SEQ_LEN][row]].tolist()
        assert [dataset.id2token("item_id", i) for i in history] == sequences[user][:6]
        prompt = model.tokenizer.decode(model.prompts.build(history))
        assert model.item_texts[int(batch["item_id"][row])] not in prompt  # the target is not in it
    scores = model.full_sort_predict(batch)
    assert scores.shape == (len(batch), model.n_items) and not torch.isnan(scores).any()
    assert all(math.isinf(scores[0, i]) for i in batch[model.ITEM_SEQ][0, : batch[model.ITEM_SEQ_LEN][0]].tolist())

"""Fine-tuning: what is trained, what is saved, what reloads, what is refused."""

import copy
import os

import numpy as np
import pytest
import torch
from conftest import build, train_steps

from recbole_llmgen import finetune
from recbole_llmgen.scoring import naive_scores
from recbole_llmgen.trainer import LLMGenTrainer


def _lora(config_dict, **extra):
    return {**config_dict, "train_mode": "lora", "epochs": 1, "lora_r": 4, **extra}


def _batch(loader, rows=None):
    batch = next(iter(loader))
    batch = batch[0] if isinstance(batch, tuple) else batch
    return batch if rows is None else batch[torch.arange(rows)]


def _grads(model):
    return {k: (p.grad.clone() if p.grad is not None else None) for k, p in model.llm_trainable.items()}


def test_lora_trains_only_adapters(toy_config_dict):
    config, model, *_ = build(_lora(toy_config_dict))
    names = list(model.llm_trainable.keys())
    assert names and all("lora_" in n for n in names)
    assert {id(p) for p in model.parameters()} == {id(p) for p in model.llm_trainable.values()}
    frozen = [n for n, p in model.llm.named_parameters() if not p.requires_grad]
    assert frozen and not any("lora_" in n for n in frozen)
    trainer = LLMGenTrainer(config, model)
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.llm_trainable.values()}


def test_prompt_tokens_carry_no_loss(toy_config_dict):
    _, model, train_data, *_ = build(_lora(toy_config_dict))
    model.eval()  # no LoRA dropout: the loss is deterministic
    batch = _batch(train_data, rows=3)
    loss = model.calculate_loss(batch)
    expected = []
    for row in range(3):
        history = batch[model.ITEM_SEQ][row, : batch[model.ITEM_SEQ_LEN][row]].tolist()
        target = model.prompts.item_token_ids[int(batch[model.ITEM_ID][row])]
        prompt = model.prompts.build(history, reserve_tokens=len(target))
        expected.append(-naive_scores(model.llm, prompt, [target])[0])
    # the loss is exactly minus the likelihood score of the target tokens: no prompt token counts
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-4)


def test_micro_batches_accumulate_the_same_gradient(toy_config_dict):
    config, model, train_data, *_ = build(
        _lora(toy_config_dict, train_batch_size=6, llm_train_batch_size=2, lora_dropout=0.0)
    )
    model.eval()
    batch = _batch(train_data, rows=6)
    model.calculate_loss(batch).backward()
    whole = _grads(model)
    model.zero_grad()
    trainer = LLMGenTrainer(config, model)
    trainer.optimizer.step = lambda: None  # keep the weights: compare gradients only
    trainer.clip_grad_norm = None
    trainer._train_epoch([batch], 0)
    model.eval()
    accumulated = _grads(model)
    assert any(g is not None and g.abs().sum() > 0 for g in whole.values())
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("score_method", ["likelihood", "verbalizer"])
def test_loss_decreases(toy_config_dict, score_method):
    _, model, train_data, *_ = build(_lora(toy_config_dict, score_method=score_method, lora_dropout=0.0))
    batch = _batch(train_data, rows=4)
    losses = train_steps(model, batch, 8, seed=1)  # verbalizer: the same candidate lists every step
    assert losses[-1] < 0.7 * losses[0], losses


def test_verbalizer_training_candidates(toy_config_dict):
    _, model, train_data, *_ = build(_lora(toy_config_dict, score_method="verbalizer"))
    batch = _batch(train_data, rows=6)
    targets = batch[model.ITEM_ID].tolist()
    shown, positions = model.training_lists(batch, targets)
    for row, (items, position, target) in enumerate(zip(shown, positions, targets)):
        history = set(batch[model.ITEM_SEQ][row, : batch[model.ITEM_SEQ_LEN][row]].tolist())
        assert items[position] == target and items.count(target) == 1
        assert len(items) == model.settings.num_candidates and not (set(items) - {target}) & history


def test_recent_rows_keeps_the_last_examples_per_user():
    users = np.array([3, 3, 3, 1, 1, 2, 3])
    assert finetune.recent_rows(users, 2).tolist() == [2, 3, 4, 5, 6]
    assert finetune.recent_rows(users, 10).tolist() == list(range(7))


def test_bounded_loader(toy_config_dict):
    _, model, train_data, *_ = build(_lora(toy_config_dict, llm_train_examples_per_user=2))
    bounded = finetune.bounded_train_loader(train_data, 2)
    dataset = bounded._dataset
    users = dataset.inter_feat[dataset.uid_field].numpy()
    assert len(dataset) == 2 * len(set(users.tolist()))
    # the kept rows are each user's longest histories (the most recent targets)
    full = train_data._dataset.inter_feat
    for user in set(users.tolist()):
        lengths = sorted(full[model.ITEM_SEQ_LEN][full[dataset.uid_field] == user].tolist())
        kept = sorted(dataset.inter_feat[model.ITEM_SEQ_LEN][dataset.inter_feat[dataset.uid_field] == user].tolist())
        assert kept == lengths[-2:]
    assert finetune.bounded_train_loader(train_data, None) is train_data


def _fit(config_dict, **kwargs):
    config, model, train_data, valid_data, test_data = build(config_dict)
    trainer = LLMGenTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=True, **kwargs)
    return config, model, trainer, test_data


def test_checkpoint_holds_only_trainable_weights_and_reloads_exactly(toy_config_dict):
    from recbole.quick_start import load_data_and_model

    before = {k: p.detach().clone() for k, p in build(_lora(toy_config_dict))[1].llm_trainable.items()}
    _, model, trainer, test_data = _fit(_lora(toy_config_dict))
    assert any(not torch.equal(before[k], p) for k, p in model.llm_trainable.items())  # it trained
    checkpoint = torch.load(trainer.saved_model_file, weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert keys == {"_extra_state"} | {f"llm_trainable.{k}" for k in model.llm_trainable.keys()}
    trainable_bytes = sum(p.numel() * 4 for p in model.llm_trainable.values())
    base_bytes = sum(p.numel() * 4 for p in model.llm.parameters())
    # weights + Adam moments + config: a few times the adapter, far below the frozen base model
    assert os.path.getsize(trainer.saved_model_file) < 3 * trainable_bytes + 200_000 < base_bytes

    model.eval()
    batch = _batch(test_data)
    expected = model.full_sort_predict(batch)
    _, reloaded, *_ = load_data_and_model(trainer.saved_model_file)
    reloaded.eval()
    torch.testing.assert_close(reloaded.full_sort_predict(batch), expected, rtol=0, atol=1e-5)


def test_full_mode_trains_every_weight(toy_config_dict):
    _, model, train_data, *_ = build({**toy_config_dict, "train_mode": "full"})
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.llm.parameters())
    loss = model.calculate_loss(_batch(train_data, rows=2))
    loss.backward()
    assert model.llm.get_input_embeddings().weight.grad is not None


def test_resume_continues_training(toy_config_dict):
    _, _, first, _ = _fit(_lora(toy_config_dict))
    saved = torch.load(first.saved_model_file, weights_only=False)
    config, model, train_data, valid_data, _ = build(
        _lora(toy_config_dict, epochs=2, checkpoint=first.saved_model_file)
    )
    trainer = LLMGenTrainer(config, model)
    seen, at_start = [], {}
    original = trainer._train_epoch

    def train_epoch(data, epoch, **kw):
        if not seen:  # the weights and optimizer state training resumes from
            at_start["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
            at_start["optimizer"] = copy.deepcopy(trainer.optimizer.state_dict())  # Adam updates in place
        seen.append(epoch)
        return original(data, epoch, **kw)

    trainer._train_epoch = train_epoch
    trainer.fit(train_data, valid_data, saved=False)
    assert seen == [saved["epoch"] + 1]  # starts after the saved epoch
    expected = {k: v for k, v in saved["state_dict"].items() if torch.is_tensor(v)}
    assert set(at_start["weights"]) == set(expected) and expected
    for key, value in expected.items():
        assert torch.equal(at_start["weights"][key], value), key  # the checkpoint's weights, not fresh ones
    resumed, stored = at_start["optimizer"]["state"], saved["optimizer"]["state"]
    assert resumed and set(resumed) == set(stored)  # Adam's moments come back too
    for key in stored:
        assert (
            torch.equal(resumed[key]["exp_avg"], stored[key]["exp_avg"]) and resumed[key]["step"] == stored[key]["step"]
        )


def test_missing_resume_checkpoint_is_named(toy_config_dict):
    config, model, train_data, valid_data, _ = build(_lora(toy_config_dict, checkpoint="nowhere.pth"))
    with pytest.raises(FileNotFoundError, match="checkpoint: 'nowhere.pth'"):
        LLMGenTrainer(config, model).fit(train_data, valid_data)


def test_mismatched_checkpoints_are_refused(toy_config_dict, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, model, trainer, _ = _fit(_lora(toy_config_dict))
    state = torch.load(trainer.saved_model_file, weights_only=False)["state_dict"]

    torch.manual_seed(123)  # same architecture, other weights
    other = LlamaForCausalLM(LlamaConfig(**{**model.llm.config.to_dict(), "architectures": None}))
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    _, other_model, *_ = build(_lora(toy_config_dict, llm_path=str(tmp_path / "other")))
    with pytest.raises(ValueError, match=r"model_file: trained on base model .*they differ in \['weights'\]"):
        other_model.load_state_dict(state)

    _, filtered, *_ = build(_lora(toy_config_dict, item_inter_num_interval="[3,inf)"))
    with pytest.raises(ValueError, match="other item mapping"):
        filtered.load_state_dict(state)

    _, full, *_ = build({**toy_config_dict, "train_mode": "full"})
    with pytest.raises(ValueError, match="train_mode='lora'"):
        full.load_state_dict(state)

    with pytest.raises(ValueError, match="not an LLMGen checkpoint"):
        model.load_state_dict({k: v for k, v in state.items() if k != "_extra_state"})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train_mode", "qlora", "train_mode: 'qlora' is not allowed; choose one of none, lora, full"),
        ("lora_dropout", 1.5, r"lora_dropout: expected a number in \[0, 1\), got 1.5"),
        ("lora_target_modules", ["nope_proj"], "lora_target_modules: \\['nope_proj'\\] does not match"),
        ("llm_train_examples_per_user", 0, "llm_train_examples_per_user: expected an integer >= 1"),
    ],
)
def test_bad_training_settings_are_named(toy_config_dict, key, value, message):
    with pytest.raises(ValueError, match=message):
        build(_lora(toy_config_dict, **{key: value}))


def test_gradient_checkpointing_gives_the_same_gradients(toy_config_dict):
    grads = []
    for checkpointing in (False, True):
        _, model, train_data, *_ = build(_lora(toy_config_dict, gradient_checkpointing=checkpointing, lora_dropout=0.0))
        model.train()
        assert model.llm.is_gradient_checkpointing == checkpointing
        model.calculate_loss(_batch(train_data, rows=3)).backward()
        grads.append(_grads(model))
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-5, rtol=1e-4)


def test_recommend_from_a_finetuned_checkpoint(toy_config_dict):
    from recbole_llmgen import recommend

    _, _, trainer, _ = _fit(_lora(toy_config_dict, learning_rate=0.05, train_batch_size=4))
    tuned = recommend(["u1", "u2"], topk=5, model_file=trainer.saved_model_file)
    again = recommend(["u1", "u2"], topk=5, model_file=trainer.saved_model_file)
    zero_shot = recommend(["u1", "u2"], topk=5, dataset="toy", config_dict=toy_config_dict)
    assert tuned.equals(again)
    assert not tuned["score"].round(5).equals(zero_shot["score"].round(5))  # the adapter is applied


def test_a_crash_mid_training_keeps_the_last_good_checkpoint(toy_config_dict, monkeypatch):
    config, model, train_data, valid_data, _ = build(_lora(toy_config_dict, epochs=3, stopping_step=5))
    trainer = LLMGenTrainer(config, model)
    calls = {"n": 0}
    original = model.calculate_loss
    rows_per_epoch = len(finetune.bounded_train_loader(train_data, model.settings.llm_train_examples_per_user)._dataset)
    micro_batches_per_epoch = -(-rows_per_epoch // model.settings.llm_train_batch_size)

    def flaky(interaction):
        calls["n"] += 1
        if calls["n"] > micro_batches_per_epoch:  # the second epoch dies
            raise RuntimeError("power cut")
        return original(interaction)

    monkeypatch.setattr(model, "calculate_loss", flaky)
    saves = []
    save = trainer._save_checkpoint
    monkeypatch.setattr(trainer, "_save_checkpoint", lambda epoch, **kw: saves.append(epoch) or save(epoch, **kw))
    with pytest.raises(RuntimeError, match="power cut"):
        trainer.fit(train_data, valid_data, saved=True)
    assert saves == [0]
    checkpoint = torch.load(trainer.saved_model_file, weights_only=False)
    assert checkpoint["epoch"] == 0
    for key, value in model.llm_trainable.items():
        torch.testing.assert_close(checkpoint["state_dict"][f"llm_trainable.{key}"], value.detach())
    folder = os.path.dirname(trainer.saved_model_file)
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")]


def test_a_checkpoint_knows_its_base_model_by_the_weights_not_the_path(toy_config_dict, tmp_path, tiny_llm_path):
    """The same weights at a moved path load the checkpoint; weights that share the first 64
    embedding rows (all format 1 compared) but differ deeper are refused; a format-1 checkpoint
    (path + 64 rows) still loads into the model it was made for."""
    import shutil

    from transformers import AutoModelForCausalLM

    _, model, trainer, _ = _fit(_lora(toy_config_dict))
    state = torch.load(trainer.saved_model_file, weights_only=False)["state_dict"]
    moved = tmp_path / "moved"
    shutil.copytree(tiny_llm_path, moved)
    _, at_moved, *_ = build(_lora(toy_config_dict, llm_path=str(moved)))
    at_moved.load_state_dict(state)  # accepted: the same weights

    tweaked = AutoModelForCausalLM.from_pretrained(tiny_llm_path)
    with torch.no_grad():
        tweaked.model.layers[0].mlp.down_proj.weight.mul_(1.01)  # embeddings untouched
    tweaked.save_pretrained(tmp_path / "tweaked")
    for name in os.listdir(tiny_llm_path):  # the tokenizer's files
        if not os.path.exists(tmp_path / "tweaked" / name):
            shutil.copy(os.path.join(tiny_llm_path, name), tmp_path / "tweaked")
    _, at_tweaked, *_ = build(_lora(toy_config_dict, llm_path=str(tmp_path / "tweaked")))
    assert at_tweaked.base_fingerprint["weights_sha1"] == model.base_fingerprint["weights_sha1"]
    with pytest.raises(ValueError, match=r"they differ in \['weights'\]"):
        at_tweaked.load_state_dict(state)

    old = dict(state["_extra_state"], format=1)
    old["base_model"] = {k: v for k, v in old["base_model"].items() if k != "weights"}
    model.load_state_dict({**state, "_extra_state": old})  # format 1: compared as format 1 did, path aside
    with pytest.raises(ValueError, match=r"they differ in \['weights_sha1'\]"):
        other = dict(old, base_model=dict(old["base_model"], weights_sha1="0" * 40))
        model.load_state_dict({**state, "_extra_state": other})

"""Training at this CPU's speed: the output layer and the loss fused in chunks, the same numbers
as the library's own logits."""

import pytest
import torch
from conftest import build
from test_sequence import _list as _sequence_list

from recbole_llmgen import finetune, sequence


def _list(config_dict, **extra):
    return _sequence_list(config_dict, **{"lora_dropout": 0.0, **extra})  # the sequence objective, no dropout


def _loss_and_grads(model, batch, autocast):
    model.llm.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.calculate_loss(batch)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.llm_trainable.items() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("train_mode", ["lora", "full"])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_loss_equals_the_models_own_logits(toy_config_dict, monkeypatch, train_mode, autocast):
    _, model, train_data, *_ = build(_list(toy_config_dict, train_mode=train_mode))
    batch = next(iter(sequence.window_loader(train_data, model, 4, 0)))
    assert finetune.fused_output_layer(model.llm) is not None  # the tiny Llama takes the fused path
    monkeypatch.setattr(finetune, "LOSS_CHUNK_ROWS", 7)  # several chunks, the last one short
    fused, fused_grads = _loss_and_grads(model, batch, autocast)
    monkeypatch.setattr(finetune, "fused_output_layer", lambda llm: None)
    plain, plain_grads = _loss_and_grads(model, batch, autocast)
    assert fused == pytest.approx(plain, rel=1e-2 if autocast else 1e-5)
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    if train_mode == "full":  # the tied output layer / embedding gets its gradient from the loss too
        assert any("embed" in k or "lm_head" in k for k in fused_grads)
    for key, grad in plain_grads.items():
        scale = grad.float().abs().max().item() + 1e-12
        error = (fused_grads[key].float() - grad.float()).abs().max().item() / scale
        assert error < (5e-2 if autocast else 1e-4), (key, error)


def test_an_adapter_on_the_output_layer_keeps_the_library_path(toy_config_dict):
    _, model, *_ = build(_list(toy_config_dict, lora_target_modules=["q_proj", "lm_head"]))
    assert finetune.fused_output_layer(model.llm) is None  # a LoRA lm_head is not a plain Linear
    _, plain, *_ = build(_list(toy_config_dict))
    assert finetune.fused_output_layer(plain.llm) is not None


def test_training_uses_eager_attention_on_cpu_and_restores_it(toy_config_dict):
    from recbole_llmgen.llm import training_attention
    from recbole_llmgen.trainer import LLMGenTrainer

    config, model, train_data, *_ = build(_list(toy_config_dict))
    assert model.llm.config._attn_implementation == "sdpa"
    batch = next(iter(sequence.window_loader(train_data, model, 4, 0)))
    with torch.no_grad():
        sdpa = model.calculate_loss(batch).item()
        with training_attention(model.llm):
            assert model.llm.config._attn_implementation == "eager"
            eager = model.calculate_loss(batch).item()
    assert eager == pytest.approx(sdpa, rel=1e-5)
    trainer = LLMGenTrainer(config, model)
    seen = []
    original = model.calculate_loss
    model.calculate_loss = lambda part: seen.append(model.llm.config._attn_implementation) or original(part)
    trainer._train_epoch(sequence.window_loader(train_data, model, 4, 0), 0)
    assert seen and set(seen) == {"eager"}
    assert model.llm.config._attn_implementation == "sdpa"  # scoring keeps its own


def test_evaluation_merges_lora_and_training_gets_the_exact_weights_back(toy_config_dict):
    from recbole_llmgen.trainer import LLMGenTrainer

    config, model, train_data, valid_data, test_data = build(_list(toy_config_dict, score_method="likelihood"))
    with torch.no_grad():  # adapters that change the scores (peft starts lora_B at zero)
        for p in model.llm_trainable.values():
            p.add_(0.3 * torch.randn_like(p))
    base = {n: m.get_base_layer().weight.detach().clone() for n, m in _lora_layers(model.llm)}
    model.train()
    batch = next(iter(test_data))[0]
    with torch.no_grad():
        unmerged = model.full_sort_predict(batch)
        model.eval()
        assert model.adapters.merged and all(m.merged for _, m in _lora_layers(model.llm))
        assert any(not torch.equal(m.get_base_layer().weight, base[n]) for n, m in _lora_layers(model.llm))
        merged = model.full_sort_predict(batch)
    finite = torch.isfinite(unmerged)
    assert torch.equal(finite, torch.isfinite(merged))
    assert torch.allclose(merged[finite], unmerged[finite], atol=1e-4, rtol=1e-4)
    model.train()
    assert not model.adapters.merged and not any(m.merged for _, m in _lora_layers(model.llm))
    assert all(torch.equal(m.get_base_layer().weight, base[n]) for n, m in _lora_layers(model.llm))  # bit for bit
    # under RecBole's trainer: validation merges, the next epoch trains the exact base weights, the
    # checkpoint holds the adapters only
    trainer = LLMGenTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    model.train()
    assert all(torch.equal(m.get_base_layer().weight, base[n]) for n, m in _lora_layers(model.llm))
    saved = torch.load(trainer.saved_model_file, weights_only=False)["state_dict"]
    assert {k for k in saved if k != "_extra_state"} == {f"llm_trainable.{k}" for k in model.llm_trainable}


def test_loading_adapters_while_merged_merges_the_new_ones(toy_config_dict):
    _, model, _, _, test_data = build(_list(toy_config_dict, score_method="likelihood"))
    _, other, *_ = build(_list(toy_config_dict, score_method="likelihood"))
    with torch.no_grad():
        for p in other.llm_trainable.values():
            p.add_(0.3 * torch.randn_like(p))
    batch = next(iter(test_data))[0]
    other.eval()
    model.eval()  # merged with its own (zero-update) adapters
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.allclose(model.full_sort_predict(batch), other.full_sort_predict(batch), atol=1e-4)


def _lora_layers(llm):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in llm.named_modules() if isinstance(m, LoraLayer)]

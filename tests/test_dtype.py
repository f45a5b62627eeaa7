"""The LLM's dtype: bf16 where the CPU computes it natively, fp32 elsewhere; training under autocast."""

import warnings

import pytest
import torch
from conftest import build

from recbole_llmgen import llm as llm_module
from recbole_llmgen.trainer import LLMGenTrainer


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\n")
    flags = llm_module.cpu_flags(str(info))
    assert {"avx512_bf16", "avx512f"} <= flags
    assert llm_module.cpu_has_fast_bf16(flags)
    assert llm_module.cpu_has_fast_bf16({"amx_bf16", "amx_tile"})
    assert not llm_module.cpu_has_fast_bf16({"avx512f", "avx512_vnni", "avx2"})  # bf16 only emulated
    assert llm_module.cpu_flags(str(tmp_path / "missing")) == set()


def test_the_machine_is_described_by_its_cpu_and_bf16_support(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert llm_module.cpu_model(str(info)) == "AMD EPYC 9R14"
    assert llm_module.cpu_model(str(tmp_path / "missing"))  # another platform: its processor string
    native = llm_module.describe_machine("cpu", {"avx2", "avx512f", "avx512_bf16"})
    assert native.endswith(", avx512_bf16, native bf16") and "cores" in native
    assert llm_module.describe_machine("cpu", {"avx2", "fma"}).endswith(", avx2, no native bf16")


@pytest.mark.parametrize(
    "llm_dtype, device, train_mode, fast, expected",
    [
        ("auto", "cpu", "none", True, torch.bfloat16),
        ("auto", "cpu", "lora", True, torch.bfloat16),
        ("auto", "cpu", "full", True, torch.float32),  # trainable weights stay fp32; autocast computes in bf16
        ("auto", "cpu", "none", False, torch.float32),
        ("auto", "cuda", "lora", False, torch.bfloat16),
        ("auto", "cuda", "full", False, torch.float32),  # fp32 master weights for Adam on CUDA too
        ("bfloat16", "cuda", "full", False, torch.float32),  # bf16 is then the autocast dtype
        ("float32", "cpu", "none", True, torch.float32),
        ("bfloat16", "cpu", "none", True, torch.bfloat16),
    ],
)
def test_auto_dtype(llm_dtype, device, train_mode, fast, expected):
    assert llm_module.resolve_dtype(llm_dtype, device, train_mode, fast_bf16=fast) == expected


def test_bf16_on_a_cpu_without_it_warns_and_unknown_dtypes_are_named():
    with pytest.warns(UserWarning, match="llm_dtype: bfloat16 on a CPU without native bf16.*llm_dtype: float32"):
        assert llm_module.resolve_dtype("bfloat16", "cpu", fast_bf16=False) == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm_module.resolve_dtype("bfloat16", "cpu", fast_bf16=True)
    with pytest.raises(ValueError, match=r"llm_dtype: 'int8' is not allowed; choose one of auto, float32"):
        llm_module.resolve_dtype("int8", "cpu")


def test_autocast_dtype():
    assert llm_module.autocast_dtype("cuda", fast_bf16=False) == torch.bfloat16
    assert llm_module.autocast_dtype("cpu", fast_bf16=True) == torch.bfloat16
    assert llm_module.autocast_dtype("cpu", fast_bf16=False) is None


@pytest.mark.parametrize("fast", [True, False])
def test_auto_picks_by_cpu_and_lora_trains_fp32_adapters_under_bf16_autocast(toy_config_dict, monkeypatch, fast):
    monkeypatch.setattr(llm_module, "cpu_has_fast_bf16", lambda flags=None: fast)
    config_dict = {**toy_config_dict, "llm_dtype": "auto", "train_mode": "lora", "lora_r": 4, "epochs": 1}
    config, model, train_data, *_ = build(config_dict)
    weight = model.llm.get_input_embeddings().weight
    assert weight.dtype == (torch.bfloat16 if fast else torch.float32)
    assert model.autocast_dtype == (torch.bfloat16 if fast else None)
    adapters = dict(model.llm_trainable.items())
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())  # fp32 master weights
    before = {k: p.detach().clone() for k, p in adapters.items()}
    seen = []
    real = model.calculate_loss

    def spy(interaction):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(interaction)

    trainer = LLMGenTrainer(config, model)
    loss = trainer._train_epoch(train_data, 0, loss_func=spy)
    assert torch.isfinite(torch.tensor(loss))
    assert seen and all(s == fast for s in seen)
    assert any(not torch.equal(before[k], p.detach()) for k, p in adapters.items())
    assert all(p.dtype == torch.float32 for p in adapters.values())


def test_full_training_keeps_fp32_weights_on_a_bf16_cpu(toy_config_dict, monkeypatch):
    monkeypatch.setattr(llm_module, "cpu_has_fast_bf16", lambda flags=None: True)
    _, model, *_ = build({**toy_config_dict, "llm_dtype": "auto", "train_mode": "full"})
    assert model.llm.get_input_embeddings().weight.dtype == torch.float32
    assert model.autocast_dtype == torch.bfloat16


def test_explicit_float32_turns_autocast_off(toy_config_dict, monkeypatch):
    monkeypatch.setattr(llm_module, "cpu_has_fast_bf16", lambda flags=None: True)
    _, model, *_ = build({**toy_config_dict, "llm_dtype": "float32", "train_mode": "lora", "lora_r": 4})
    assert model.autocast_dtype is None


@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_float16_training_is_named(toy_config_dict, train_mode):
    with pytest.raises(ValueError, match="llm_dtype: float16 cannot train .*gradient scaler.*choose auto or bfloat16"):
        build({**toy_config_dict, "llm_dtype": "float16", "train_mode": train_mode})


def test_moving_the_model_elsewhere_is_refused_by_name(toy_config_dict):
    _, model, *_ = build({**toy_config_dict, "train_mode": "lora", "lora_r": 2})
    assert model.to(model.device) is model  # RecBole's own .to(config["device"]) keeps working
    before = {name: p.dtype for name, p in model.named_parameters()}
    for move in (model.half, lambda: model.to(torch.float64), model.double):
        with pytest.raises(ValueError, match="LLMGen: moving the model to .* not supported .*llm_dtype"):
            move()
    assert {name: p.dtype for name, p in model.named_parameters()} == before  # nothing moved halfway
    assert all(p.dtype == torch.float32 for p in model.llm.parameters() if p.requires_grad)

"""The real bundled SmolLM2-135M-Instruct through RecBole's own run_recbole on a few ml-100k users."""

import math


def test_bundled_model_zero_shot_on_ml100k(cache_dir, tmp_path):
    from recbole.quick_start import run_recbole

    config = {
        "llm_cache_dir": str(cache_dir),
        "user_inter_num_interval": "[400,inf)",
        "checkpoint_dir": str(tmp_path / "saved"),
        "show_progress": False,
        "state": "ERROR",
    }
    result = run_recbole(model="LLMGen", dataset="ml-100k", config_dict=config)
    # the metrics are those of the model's own scores, computed by hand (a handful of users)
    from conftest import hand_metrics
    from recbole.quick_start import load_data_and_model

    (saved,) = (tmp_path / "saved").glob("LLMGen-*.pth")
    _, model, _, _, _, test_data = load_data_and_model(str(saved))
    assert {k: result["test_result"][k] for k in ("ndcg@10", "hit@10")} == hand_metrics(model, test_data)
    assert not math.isnan(result["test_result"]["mrr@10"])
    # the GGUF was de-quantized once into the cache folder, as safetensors
    (cached,) = [p for p in cache_dir.iterdir() if p.name.startswith("SmolLM2-135M-Instruct.Q4_1-")]
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()


def test_bundled_model_prefers_the_right_movie(cache_dir):
    """A real LM, not noise: after Star Wars sequels, the next Star Wars film outscores a random title."""
    from recbole_llmgen import scoring
    from recbole_llmgen.llm import load_llm

    model, tokenizer = load_llm("bundled:smollm2", cache_dir=cache_dir)
    messages = [
        {
            "role": "user",
            "content": "I watched:\n1. Star Wars (1977)\n2. The Empire Strikes Back (1980)\nRecommend the next movie.",
        }
    ]
    prompt = tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )["input_ids"]
    conts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["Return of the Jedi (1983)", "Kolya (1996)"]]
    scores = scoring.shared_prefix_scores(model, prompt, conts)
    assert scores[0] > scores[1]


def test_bundled_model_in_bf16_ranks_like_fp32(cache_dir):
    """bf16 weights (auto on a CPU with native bf16) keep the fp32 ranking of candidates."""
    from scipy.stats import spearmanr

    from recbole_llmgen import scoring
    from recbole_llmgen.llm import load_llm

    titles = ["Return of the Jedi (1983)", "Kolya (1996)", "Toy Story (1995)", "Aliens (1986)", "Fargo (1996)"]
    titles += ["Heat (1995)", "Babe (1995)", "Casablanca (1942)", "Scream (1996)", "Contact (1997)"]
    scores = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_llm("bundled:smollm2", cache_dir=cache_dir, llm_dtype=dtype)
        prompt = tokenizer("Movies watched:\nStar Wars (1977)\nThe Empire Strikes Back (1980)\n")["input_ids"]
        conts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in titles]
        scores[dtype] = scoring.shared_prefix_scores(model, prompt, conts)
    assert (scores["float32"] - scores["bfloat16"]).abs().max() < 0.5
    assert spearmanr(scores["float32"].numpy(), scores["bfloat16"].numpy()).statistic > 0.9


def test_bundled_model_recommends_with_explanations(cache_dir):
    from recbole_llmgen import recommend

    config = {"llm_cache_dir": str(cache_dir), "score_method": "generate", "num_beams": 5, "state": "ERROR"}
    frame = recommend("196", topk=3, dataset="ml-100k", config_dict=config, explain=True)
    assert len(frame) == 3 and frame["item_id"].is_unique
    assert all(len(e.split()) >= 3 for e in frame["explanation"])


def test_gguf_cache_is_written_on_any_rank_and_repaired_when_incomplete(tmp_path, monkeypatch):
    """transformers 5's save_pretrained writes nothing on a torch.distributed rank other than 0; the
    cache once ended up with tokenizer files only, which every later load then failed on."""
    import transformers.distributed.mixin as mixin

    from recbole_llmgen.llm import load_llm

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    load_llm("bundled:smollm2", cache_dir=tmp_path)  # as rank 1
    (cached,) = [p for p in tmp_path.iterdir() if p.name.startswith("SmolLM2-135M-Instruct.Q4_1-")]
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    # what the bug left behind: a folder with the tokenizer only
    (cached / "config.json").unlink()
    (cached / "model.safetensors").unlink()
    model, _ = load_llm("bundled:smollm2", cache_dir=tmp_path)
    assert (cached / "config.json").is_file() and model.config.model_type == "llama"
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no staging folder left behind

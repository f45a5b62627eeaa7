"""LLMGen's settings: every key of ``properties/LLMGen.yaml`` read once from a RecBole Config and
checked, with errors that name the key, the value and what is allowed.

:meth:`LLMGenSettings.from_config` is the only place that reads LLMGen's keys; the model and its
collaborators (prompts, scorer, generator, retriever) take the checked settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from recbole_llmgen import item_tokens, seen_items, text
from recbole_llmgen.registry import known_model_names
from recbole_llmgen.scoring import DEFAULT_BATCH_TOKENS

SCORE_METHODS = ("likelihood", "verbalizer", "generate")
TRAIN_MODES = ("none", "lora", "full")
TRAIN_OBJECTIVES = ("next_item", "sequence")
GENERATION_CONSTRAINTS = ("trie", "none")
BUILT_IN_SOURCES = ("pop", "text", "none")  # besides a RecBole model file or model name
FUSION_GRID = tuple(round(0.1 * i, 1) for i in range(11))
LENGTH_PENALTY_GRID = (1.0, 0.75, 0.5, 0.25, 0.0)  # length_penalty: auto chooses among these on valid


def is_model_file(source: str) -> bool:
    return source.endswith(".pth") or os.path.sep in source or os.path.isfile(source)


def validate_source(source: str) -> str:
    """'builtin', 'file' or 'model' for a ``candidate_source`` value; a named error otherwise."""
    if not isinstance(source, str) or not source:
        raise ValueError(
            f"candidate_source: expected pop, text, none, a RecBole model file or model name, got {source!r}"
        )
    if source in BUILT_IN_SOURCES:
        return "builtin"
    if is_model_file(source):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"candidate_source: model file {source!r} does not exist")
        return "file"
    names = known_model_names()
    if source not in names:
        raise ValueError(
            f"candidate_source: {source!r} is not allowed; choose pop, text, none, a saved RecBole model file "
            f"(.pth) or a RecBole model name such as SASRec, BPR, GRU4Rec (known: {len(names)} models)"
        )
    if source == "LLMGen":
        raise ValueError("candidate_source: LLMGen cannot propose its own candidates; choose a classic model")
    return "model"


def choice(config, key: str, allowed: tuple[str, ...]) -> str:
    value = config[key]
    if value not in allowed:
        raise ValueError(f"{key}: {value!r} is not allowed; choose one of {', '.join(allowed)}")
    return value


def positive_int(config, key: str) -> int:
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key}: expected an integer >= 1, got {value!r}")
    return value


def optional_positive_int(config, key: str, none_means: str) -> int | None:
    value = config[key]
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{key}: expected an integer >= 1 or ~ ({none_means}), got {value!r}")
    return value


def length_penalty(config, score_method: str) -> float | str:
    """A number in [0, 2], or ``auto`` (chosen from ``LENGTH_PENALTY_GRID`` on the valid split)."""
    value = config["length_penalty"]
    if value == "auto":
        if score_method == "verbalizer":
            raise ValueError(
                "length_penalty: auto chooses how item likelihoods are length-normalised, and score_method: "
                "verbalizer scores one label token per candidate; use likelihood or generate, or a number"
            )
        return "auto"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise ValueError(
            f"length_penalty: expected a number in [0, 2] (an item's score is its summed token log-probability "
            f"divided by its token count to this power: 1 the mean, 0 the sum) or auto (chosen from "
            f"{', '.join(f'{v:g}' for v in LENGTH_PENALTY_GRID)} on the valid split), got {value!r}"
        )
    return float(value)


@dataclass
class LLMGenSettings:
    """LLMGen's keys, checked (see ``properties/LLMGen.yaml`` for each one's meaning)."""

    # the language model
    llm_path: str
    llm_dtype: str
    llm_cache_dir: str | None
    llm_max_length: int | None
    trust_remote_code: bool
    use_chat_template: object  # auto | True | False
    # item texts and prompts
    item_text_fields: object  # auto | a field | a list of fields
    item_text_template: str | None
    max_item_text_tokens: int
    max_history_items: int
    prompt_template: str
    prompt_format: str
    list_header: str | None
    system_prompt: str | None
    request_template: str
    request_weight: float
    request_focus: float
    # candidates and scoring
    candidate_source: str
    candidate_kind: str  # builtin | file | model
    num_candidates: int
    text_encoder_path: str
    score_method: str
    verbalizer_permutations: int
    popularity_prior: float
    length_penalty: float | str  # an item's score: summed token log-prob / tokens ** this (1: the mean, 0: the
    #   sum), or "auto": chosen on the valid split (the model's ``length_penalty`` holds the value in use)
    score_fusion: str  # none | auto | weight
    fusion_weight: float | None
    llm_score_batch_tokens: int
    num_beams: int
    generation_constraint: str
    generation_users_per_batch: int
    # training
    train_mode: str
    lora: dict | None
    train_objective: str
    window_stride: int
    llm_train_examples_per_user: int | None
    llm_train_batch_size: int
    gradient_checkpointing: bool
    seed: int
    seen_items: str  # mask | keep: may an evaluated ranking hold items the user saw before (seen_items)
    item_id_format: str = "title"  # title | token: how an item is written (recbole_llmgen.item_tokens)

    @classmethod
    def from_config(cls, config, n_items: int) -> LLMGenSettings:
        """Every LLMGen key of ``config``, checked; ``n_items`` counts RecBole's padding item."""
        if "llm_score_batch_size" in config.final_config_dict:
            raise ValueError(
                "llm_score_batch_size: replaced by llm_score_batch_tokens (packed tokens per scoring pass, "
                f"several users share one); remove it, e.g. llm_score_batch_tokens: {DEFAULT_BATCH_TOKENS}"
            )
        score_method = choice(config, "score_method", SCORE_METHODS)
        train_mode = choice(config, "train_mode", TRAIN_MODES)
        num_candidates = positive_int(config, "num_candidates")
        if num_candidates > n_items - 1:
            raise ValueError(
                f"num_candidates: {num_candidates} exceeds the number of items in the dataset ({n_items - 1}); "
                f"choose 1..{n_items - 1}"
            )
        if config["llm_dtype"] == "float16" and train_mode != "none":
            raise ValueError(
                f"llm_dtype: float16 cannot train (train_mode: {train_mode}): fp16 gradients underflow without a "
                "gradient scaler, which LLMGen does not use; choose auto or bfloat16 (bf16 autocast) or float32"
            )
        max_history_items = positive_int(config, "max_history_items")
        prompt_template = config["prompt_template"]
        if "{history}" not in (prompt_template or ""):
            raise ValueError(f"prompt_template: must contain '{{history}}', got {prompt_template!r}")
        request_template = config["request_template"] or ""
        text.request_line(request_template, "x")  # a template without {request}: named now
        request_weight = float(config["request_weight"] if config["request_weight"] is not None else 0.0)
        if not 0.0 <= request_weight <= 1.0:
            raise ValueError(f"request_weight: expected a number in [0, 1], got {config['request_weight']!r}")
        focus = config["request_focus"]
        if isinstance(focus, bool) or not isinstance(focus, (int, float)) or focus < 0:
            raise ValueError(f"request_focus: expected a number >= 0, got {focus!r}")
        prompt_format = choice(config, "prompt_format", text.PROMPT_FORMATS)
        if prompt_format == "list" and score_method == "verbalizer":
            raise ValueError(
                "prompt_format: list continues the item list with the next item and works with score_method "
                "likelihood | generate; score_method: verbalizer needs prompt_format: chat"
            )
        train_objective = choice(config, "llm_train_objective", TRAIN_OBJECTIVES)
        if train_objective == "sequence" and prompt_format != "list":
            raise ValueError(
                "llm_train_objective: sequence trains the next line of an item list at every position, so the "
                "scored text must continue that list: set prompt_format: list (or llm_train_objective: next_item)"
            )
        stride = optional_positive_int(config, "llm_train_window_stride", "max_history_items")
        candidate_source = config["candidate_source"]
        item_id_format = choice(config, "item_id_format", item_tokens.FORMATS)
        if candidate_source == "none" and score_method != "generate" and item_id_format != "token":
            raise ValueError(
                f"candidate_source: none (no candidate model) needs score_method: generate, which writes items from "
                f"the whole catalogue, or item_id_format: token, which ranks it; score_method: {score_method} scores "
                "a candidate list: choose pop, text, a RecBole model file or model name"
            )
        score_fusion, fusion_weight = fusion_setting(config["score_fusion"], candidate_source)
        constraint = choice(config, "generation_constraint", GENERATION_CONSTRAINTS)
        if score_fusion != "none" and score_method == "generate" and constraint == "none":
            raise ValueError(
                "score_fusion: free generation (generation_constraint: none) scores every item by its similarity to "
                "a generation, with no beam score to fuse; use generation_constraint: trie or score_fusion: none"
            )
        if item_id_format == "token" and prompt_format != "list":
            raise ValueError(
                "item_id_format: token writes the history as one item token per position after the list header: "
                "set prompt_format: list"
            )
        if item_id_format == "token" and score_fusion != "none":
            raise ValueError(
                "item_id_format: token with score_fusion is not built yet (the item head ranks the whole catalogue "
                "alone); set score_fusion: none"
            )
        return cls(
            llm_path=config["llm_path"],
            llm_dtype=config["llm_dtype"],
            llm_cache_dir=config["llm_cache_dir"],
            llm_max_length=config["llm_max_length"],
            trust_remote_code=bool(config["trust_remote_code"]),
            use_chat_template=config["use_chat_template"],
            item_text_fields=config["item_text_fields"],
            item_text_template=config["item_text_template"],
            max_item_text_tokens=positive_int(config, "max_item_text_tokens"),
            max_history_items=max_history_items,
            prompt_template=prompt_template,
            prompt_format=prompt_format,
            list_header=text.list_header(config["list_prompt_template"]) if prompt_format == "list" else None,
            system_prompt=config["system_prompt"],
            request_template=request_template,
            request_weight=request_weight,
            request_focus=float(focus),
            candidate_source=candidate_source,
            candidate_kind=validate_source(candidate_source),
            num_candidates=num_candidates,
            text_encoder_path=config["text_encoder_path"],
            score_method=score_method,
            verbalizer_permutations=positive_int(config, "verbalizer_permutations"),
            popularity_prior=float(config["popularity_prior"] or 0.0),
            length_penalty=length_penalty(config, score_method),
            score_fusion=score_fusion,
            fusion_weight=fusion_weight,
            llm_score_batch_tokens=positive_int(config, "llm_score_batch_tokens"),
            num_beams=positive_int(config, "num_beams"),
            generation_constraint=constraint,
            generation_users_per_batch=positive_int(config, "generation_users_per_batch"),
            train_mode=train_mode,
            lora=lora_settings(config) if train_mode == "lora" else None,
            train_objective=train_objective,
            window_stride=stride or max_history_items,
            llm_train_examples_per_user=optional_positive_int(config, "llm_train_examples_per_user", "all"),
            llm_train_batch_size=positive_int(config, "llm_train_batch_size"),
            gradient_checkpointing=bool(config["gradient_checkpointing"]),
            seed=int(config["seed"] or 0),
            seen_items=seen_items.check(config["seen_items"]),
            item_id_format=item_id_format,
        )


def fusion_setting(value, candidate_source: str) -> tuple[str, float | None]:
    """``score_fusion``: ("none", None), ("auto", None until validation chooses) or ("weight", w)."""
    if value in (None, "none"):
        return "none", None
    if candidate_source == "none":
        raise ValueError(
            f"score_fusion: {value!r} fuses the LLM's scores with the candidate model's, but candidate_source: none "
            "has no candidate model; name one (pop, text, a RecBole model file or name) or set score_fusion: none"
        )
    if value == "auto":
        return "auto", None
    given = value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"score_fusion: {given!r} is not allowed; choose none, auto (weight chosen on the valid split) "
            "or a weight in [0, 1] (0 = the candidate model's ranking, 1 = the LLM's)"
        )
    return "weight", float(value)


def lora_settings(config) -> dict:
    dropout = float(config["lora_dropout"])
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout: expected a number in [0, 1), got {config['lora_dropout']!r}")
    targets = config["lora_target_modules"]
    if not (
        isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        raise ValueError(f"lora_target_modules: expected 'all-linear' or a list of layer names, got {targets!r}")
    return {
        "r": positive_int(config, "lora_r"),
        "alpha": float(config["lora_alpha"]),
        "dropout": dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
    }

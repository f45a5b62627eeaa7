"""LLMGen: a Hugging Face causal LM as a RecBole sequential recommender.

Reads its config once in ``__init__``; prompts come from :mod:`recbole_llmgen.text`, the LLM from
:mod:`recbole_llmgen.llm`, scores from :mod:`recbole_llmgen.scoring`, candidates from
:mod:`recbole_llmgen.candidates`. The frozen LLM is kept out of the module tree, so RecBole's
optimizer and ``state_dict()`` never see it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_llmgen import candidates as cand
from recbole_llmgen import finetune, generation, scoring, sequence, text, two_stage
from recbole_llmgen.llm import autocast_dtype, load_llm

logger = logging.getLogger(__name__)

SCORE_METHODS = ("likelihood", "verbalizer", "generate")
TRAIN_OBJECTIVES = ("next_item", "sequence")
FUSION_GRID = tuple(round(0.1 * i, 1) for i in range(11))
CANDIDATE_SOURCES = two_stage.BUILT_IN_SOURCES  # or a RecBole model file / model name
TRAIN_MODES = finetune.TRAIN_MODES
GENERATION_CONSTRAINTS = ("trie", "none")


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


def read_atomic_header(path: str) -> list[str]:
    """Field names (without ``:type``) of a RecBole atomic file, or [] when it does not exist."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    return [column.split(":")[0] for column in header]


def has_recbole_dataset_yaml(dataset: str) -> bool:
    import recbole

    root = os.path.dirname(recbole.__file__)
    return os.path.isfile(os.path.join(root, "properties", "dataset", f"{dataset}.yaml"))


def _alias_history_lists(config) -> None:
    """Pre-split benchmark files may carry each history as ``item_id_list``: map its tokens into
    the item id space (RecBole's ``alias_of_item_id``) unless the user configured aliases."""
    final = config.final_config_dict
    splits = final.get("benchmark_filename")
    if not splits or "alias_of_item_id" in config.external_config_dict:
        return
    list_field = final["ITEM_ID_FIELD"] + final["LIST_SUFFIX"]
    header = read_atomic_header(os.path.join(final["data_path"], f"{final['dataset']}.{splits[0]}.inter"))
    if list_field in header:
        final["alias_of_item_id"] = [*(final.get("alias_of_item_id") or []), list_field]


def finalize_config(config) -> None:
    """Make RecBole load the item fields (ml-100k's yaml loads only the .inter columns).

    Runs after every config layer is merged. A ``load_col`` the user wrote is left alone: the
    model then names any missing field and how to add it.
    """
    _alias_history_lists(config)
    load_col = config.final_config_dict.get("load_col")
    if not isinstance(load_col, dict) or "load_col" in config.external_config_dict:
        return
    if not has_recbole_dataset_yaml(config.final_config_dict["dataset"]):
        # RecBole's sample.yaml would load only user_id and item_id: no timestamps to order
        # histories by, no item texts. A user's own dataset loads every column.
        config.final_config_dict["load_col"] = None
        return
    fields = config.final_config_dict.get("item_text_fields", "auto")
    item_id = config.final_config_dict["ITEM_ID_FIELD"]
    dataset = config.final_config_dict["dataset"]
    header = read_atomic_header(os.path.join(config.final_config_dict["data_path"], f"{dataset}.item"))
    if fields == "auto":
        if not header:
            return  # no .item file: the model reports it
        fields = text.default_text_fields(header, item_id)
    if isinstance(fields, str):
        fields = [fields]
    item_cols = list(load_col.get("item", [])) or [item_id]
    # the text fields, and every other item field: a request ("a comedy") is matched to them (genres...)
    for field in [item_id, *fields, *(header or [])]:
        if field not in item_cols:
            item_cols.append(field)
    config.final_config_dict["load_col"] = {**load_col, "item": item_cols}


class LLMGen(SequentialRecommender):
    r"""An LLM reranks (or scores) items from the text of the user's history.

    Zero-shot: ``train_mode: none`` trains nothing; see ``properties/LLMGen.yaml`` for every key.
    """

    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        # --- config, read once ---
        self.score_method = choice(config, "score_method", SCORE_METHODS)
        self.candidate_source = config["candidate_source"]
        self.candidate_kind = two_stage.validate_source(self.candidate_source)
        self.train_mode = choice(config, "train_mode", TRAIN_MODES)
        self.num_candidates = positive_int(config, "num_candidates")
        if self.num_candidates > self.n_items - 1:
            raise ValueError(
                f"num_candidates: {self.num_candidates} exceeds the number of items in the "
                f"dataset ({self.n_items - 1}); choose 1..{self.n_items - 1}"
            )
        self.max_history_items = positive_int(config, "max_history_items")
        self.max_item_text_tokens = positive_int(config, "max_item_text_tokens")
        self.verbalizer_permutations = positive_int(config, "verbalizer_permutations")
        if "llm_score_batch_size" in config.final_config_dict:
            raise ValueError(
                "llm_score_batch_size: replaced by llm_score_batch_tokens (packed tokens per scoring pass, "
                f"several users share one); remove it, e.g. llm_score_batch_tokens: {scoring.DEFAULT_BATCH_TOKENS}"
            )
        self.llm_score_batch_tokens = positive_int(config, "llm_score_batch_tokens")
        self.num_beams = positive_int(config, "num_beams")
        self.generation_users_per_batch = positive_int(config, "generation_users_per_batch")
        self.generation_constraint = choice(config, "generation_constraint", GENERATION_CONSTRAINTS)
        self.generation_stats = {"generations": 0, "exact": 0}
        self.popularity_prior = float(config["popularity_prior"] or 0.0)
        self.prompt_template = config["prompt_template"]
        if "{history}" not in (self.prompt_template or ""):
            raise ValueError(f"prompt_template: must contain '{{history}}', got {self.prompt_template!r}")
        self.system_prompt = config["system_prompt"]
        self.request_template = config["request_template"] or ""
        text.request_line(self.request_template, "x")  # a template without {request}: named now
        self.request_weight = float(config["request_weight"] if config["request_weight"] is not None else 0.0)
        if not 0.0 <= self.request_weight <= 1.0:
            raise ValueError(f"request_weight: expected a number in [0, 1], got {config['request_weight']!r}")
        focus = config["request_focus"]
        if isinstance(focus, bool) or not isinstance(focus, (int, float)) or focus < 0:
            raise ValueError(f"request_focus: expected a number >= 0, got {focus!r}")
        self.request_focus = float(focus)
        self.prompt_format = choice(config, "prompt_format", text.PROMPT_FORMATS)
        self.list_header = text.list_header(config["list_prompt_template"]) if self.prompt_format == "list" else None
        if self.prompt_format == "list" and self.score_method == "verbalizer":
            raise ValueError(
                "prompt_format: list continues the item list with the next item and works with score_method "
                "likelihood | generate; score_method: verbalizer needs prompt_format: chat"
            )
        self.train_objective = choice(config, "llm_train_objective", TRAIN_OBJECTIVES)
        if self.train_objective == "sequence" and self.prompt_format != "list":
            raise ValueError(
                "llm_train_objective: sequence trains the next line of an item list at every position, so the "
                "scored text must continue that list: set prompt_format: list (or llm_train_objective: next_item)"
            )
        stride = config["llm_train_window_stride"]
        if stride is not None and (not isinstance(stride, int) or isinstance(stride, bool) or stride < 1):
            raise ValueError(
                f"llm_train_window_stride: expected an integer >= 1 or ~ (max_history_items), got {stride!r}"
            )
        self.window_stride = stride or self.max_history_items
        self.score_fusion, self.fusion_weight = self._fusion_setting(config["score_fusion"])
        self.seed = int(config["seed"] or 0)
        self.lora = self._lora_settings(config) if self.train_mode == "lora" else None
        self.llm_train_batch_size = positive_int(config, "llm_train_batch_size")
        per_user = config["llm_train_examples_per_user"]
        if per_user is not None and (not isinstance(per_user, int) or isinstance(per_user, bool) or per_user < 1):
            raise ValueError(f"llm_train_examples_per_user: expected an integer >= 1 or ~ (all), got {per_user!r}")
        self.llm_train_examples_per_user = per_user

        # --- item texts ---
        self.item_texts = self._item_texts(config, dataset)  # index = inner item id

        # --- the LLM, frozen and outside the module tree ---
        llm, tokenizer = load_llm(
            config["llm_path"],
            device=self.device,
            llm_dtype=config["llm_dtype"],
            cache_dir=config["llm_cache_dir"],
            trust_remote_code=bool(config["trust_remote_code"]),
            train_mode=self.train_mode,
        )
        object.__setattr__(self, "llm", llm)
        # training computes in bf16 where the hardware does (CUDA, CPUs with native bf16) unless the
        # user asked for fp32; trainable weights stay fp32 (peft upcasts adapters, full keeps fp32)
        self.autocast_dtype = None if config["llm_dtype"] == "float32" else autocast_dtype(self.device)
        self.base_fingerprint = finetune.fingerprint(llm, config["llm_path"])
        peft_model = finetune.make_trainable(llm, self.train_mode, self.lora, bool(config["gradient_checkpointing"]))
        object.__setattr__(self, "peft_model", peft_model)  # for save_pretrained exports; not a submodule
        self.llm_trainable = torch.nn.ParameterDict(finetune.trainable_parameters(llm))
        self.items_fingerprint = finetune.items_fingerprint(config["dataset"], dataset.field2id_token[self.ITEM_ID])
        self.tokenizer = tokenizer
        use_chat = config["use_chat_template"]
        has_template = getattr(tokenizer, "chat_template", None) is not None
        self.use_chat = has_template if use_chat in ("auto", None) else bool(use_chat)
        if self.prompt_format == "list":
            self.use_chat = False  # a plain text list the model continues, no chat turn
        if self.use_chat and not has_template:
            raise ValueError(
                f"use_chat_template: True, but the tokenizer of {config['llm_path']!r} has no chat template"
            )
        # list format: the header's tokens, once (every prompt and training row starts with them)
        self.list_head = self._encode(self.list_header) if self.prompt_format == "list" else None
        context = getattr(llm.config, "max_position_embeddings", None) or 2048
        self.max_length = int(config["llm_max_length"] or context)
        self.item_token_ids = self._tokenize_items()
        self.label_token_ids = self._label_token_ids() if self.score_method == "verbalizer" else None
        self._warned_overflow = False
        self._shared_prefix = None
        self._trie = None
        self._score_cache: dict = {}  # LLM scores of (user, history, candidates) until the weights change

        # --- candidates ---
        self.item_counts = cand.item_counts(dataset.inter_feat[self.ITEM_ID], self.n_items)
        # every training item of each user (masked from its candidates, as RecBole masks a general model's history)
        self.training_items = {u: sorted(set(seq)) for u, seq in sequence.training_sequences(dataset).items()}
        # a classic RecBole model's checkpoint proposes candidates; saved with LLMGen's checkpoint
        self.other_parameter_name = ["candidate_model_file", "fusion_weight"]
        self.candidate_model_file = self.candidate_source if self.candidate_kind == "file" else None
        self._candidate_dataset = dataset
        self._candidate_config = config
        self._candidate_model = None
        if self.candidate_model_file:
            self.candidate_model()  # a mismatched file fails now, before any evaluation
        self._item_embeddings = None
        self.text_encoder_path = config["text_encoder_path"]

    def _fusion_setting(self, value) -> tuple[str, float | None]:
        """``score_fusion``: ("none", None), ("auto", None until validation chooses) or ("weight", w)."""
        if value in (None, "none"):
            return "none", None
        if self.score_method == "generate":
            raise ValueError(
                f"score_fusion: {value!r} fuses the LLM's scores of the candidate list with the candidate model's, "
                "but score_method: generate ranks the whole catalogue without a candidate list: nothing to fuse; "
                "use score_method likelihood | verbalizer, or score_fusion: none"
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

    @staticmethod
    def _lora_settings(config) -> dict:
        dropout = float(config["lora_dropout"])
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora_dropout: expected a number in [0, 1), got {config['lora_dropout']!r}")
        targets = config["lora_target_modules"]
        if not (
            isinstance(targets, str)
            or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
        ):
            raise ValueError(f"lora_target_modules: expected 'all-linear' or a list of layer names, got {targets!r}")
        return {
            "r": positive_int(config, "lora_r"),
            "alpha": float(config["lora_alpha"]),
            "dropout": dropout,
            "target_modules": targets if isinstance(targets, str) else list(targets),
        }

    # ------------------------------------------------------------------ training state
    def identity(self) -> dict:
        """What a checkpoint must match to be loaded into this model."""
        return {
            "format": finetune.CHECKPOINT_FORMAT,
            "base_model": self.base_fingerprint,
            "items": self.items_fingerprint,
            "train_mode": self.train_mode,
            "lora": self.lora,
            "objective": self.train_objective if self.train_mode != "none" else None,
        }

    def get_extra_state(self) -> dict:
        return self.identity()

    def set_extra_state(self, state) -> None:
        finetune.check_checkpoint(state, self.identity())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Check the identity card first (a named error, before any weight is touched), then load."""
        finetune.check_checkpoint(state_dict.get("_extra_state"), self.identity())
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._shared_prefix = None  # cached KV of the old weights
        self._score_cache = {}
        return result

    @contextlib.contextmanager
    def training_precision(self):
        """Where training's forward and loss run: under bf16 autocast when ``autocast_dtype`` is set
        (trainable weights stay fp32); peft's cast of each LoRA input to the adapter's fp32 is then
        skipped, since autocast casts it back to bf16 anyway (two copies of every activation saved)."""
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            if self.peft_model is None:
                yield
                return
            from peft.helpers import disable_input_dtype_casting

            with disable_input_dtype_casting(self.llm):
                yield

    def train(self, mode: bool = True):
        """Also switches the LLM (outside the module tree) between train and eval mode."""
        super().train(mode)
        self.llm.train(mode and self.train_mode != "none")
        self._shared_prefix = None  # weights may change while training: recompute after
        if mode:
            self._score_cache = {}
        return self

    # ------------------------------------------------------------------ item texts and prompts
    def _item_texts(self, config, dataset) -> list[str]:
        fields = config["item_text_fields"]
        available = list(dataset.item_feat.columns) if dataset.item_feat is not None else []
        data_file = os.path.join(config["data_path"], f"{config['dataset']}.item")
        in_file = read_atomic_header(data_file)
        if fields == "auto":
            fields = text.default_text_fields(in_file or available, self.ITEM_ID)
        if isinstance(fields, str):
            fields = [fields]
        missing = [f for f in fields if f not in available]
        if missing:
            if not in_file:
                where = f"there is no item file {data_file}"
            elif all(f in in_file for f in missing):
                where = (
                    f"they are in {data_file} but not loaded: add them to load_col, e.g. "
                    f"load_col: {{item: {[self.ITEM_ID, *fields]}}}"
                )
            else:
                where = f"item fields that exist: {[f for f in in_file if f != self.ITEM_ID]}"
            raise ValueError(f"item_text_fields: {missing} not found among the loaded item fields; {where}")
        template = config["item_text_template"] or text.default_template(fields)
        unknown = [f for f in text.template_fields(template) if f not in available]
        if unknown:
            raise ValueError(f"item_text_template: {template!r} names {unknown}, not loaded item fields {available}")
        columns = {f: self._field_strings(dataset, f) for f in text.template_fields(template)}
        tokens = dataset.field2id_token[self.ITEM_ID]
        texts = [""] + [
            text.render_item_text(template, {f: columns[f][i] for f in columns}) for i in range(1, self.n_items)
        ]
        return text.fill_empty_texts(texts, tokens, f"item_text_fields {fields}")

    def _field_strings(self, dataset, field: str) -> list[str]:
        """The field's value for every item id as a string (token_seq fields joined by spaces)."""
        values = dataset.item_feat[field]
        kind = dataset.field2type[field].name
        if kind in ("TOKEN", "TOKEN_SEQ"):
            id2token = dataset.field2id_token[field]
            if kind == "TOKEN":
                return ["" if v == 0 else str(id2token[v]) for v in values.tolist()]
            return [" ".join(str(id2token[t]) for t in row if t != 0) for row in values.tolist()]
        if kind == "FLOAT":
            return [f"{v:g}" for v in values.tolist()]
        return [" ".join(f"{x:g}" for x in row) for row in values.tolist()]

    def _tokenize_items(self) -> list[list[int]]:
        """Token ids of each item text as it continues the prompt, cut to max_item_text_tokens.

        ``prompt_format: list``: the text and its line break (the item's end is part of what is
        scored: "Heat" is not "Heat 2"), the line break kept when the text is cut."""
        if self.prompt_format == "list":
            newline = self.tokenizer.encode("\n", add_special_tokens=False)[-1:]
            encoded = self.tokenizer([t + "\n" for t in self.item_texts], add_special_tokens=False)["input_ids"]
            limit = self.max_item_text_tokens
            return [list(ids) if len(ids) <= limit else list(ids[: limit - 1]) + newline for ids in encoded]
        prefix = "" if self.use_chat else " "
        encoded = self.tokenizer([prefix + t for t in self.item_texts], add_special_tokens=False)["input_ids"]
        return [list(ids[: self.max_item_text_tokens]) for ids in encoded]

    def _label_token_ids(self) -> list[int]:
        prefix = "" if self.use_chat else " "
        ids = []
        for label in text.LABELS:
            encoded = self.tokenizer.encode(prefix + label, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"score_method: verbalizer needs single-token labels; {label!r} is {encoded}")
            ids.append(encoded[0])
        return ids

    def render_prompt(self, user_text: str) -> str:
        if self.use_chat:
            messages = [{"role": "user", "content": user_text}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        head = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        tail = "\nAnswer:" if self.score_method == "verbalizer" else "\nRecommendation:"
        return head + user_text + tail

    def _encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=not self.use_chat)["input_ids"]

    def build_prompt(
        self,
        history: list[int],
        candidate_ids: list[int] | None = None,
        reserve_tokens: int = 0,
        request: str | None = None,
    ) -> list[int]:
        """Prompt token ids from the most recent ``max_history_items`` items (oldest dropped on overflow).

        ``history`` holds inner item ids, oldest first, and never the target (RecBole's
        ``item_id_list`` is the sequence *before* the target). ``request``: what the user asks for
        now, in their own words (chat: a line after the history; list: a line before the list, so
        the list still ends where the next item begins).
        """
        window = [i for i in history if i != 0][-self.max_history_items :]
        reserve = reserve_tokens if candidate_ids is None else max(len(self.item_token_ids[i]) for i in candidate_ids)
        line = text.request_line(self.request_template, request) if request is not None else None
        if self.prompt_format == "list":
            return self.list_prompt(window, reserve, line)
        while True:
            texts = [self.item_texts[i] for i in window]
            if self.score_method == "verbalizer" and candidate_ids is not None:
                user_text = text.verbalizer_prompt(
                    self.prompt_template, texts, [self.item_texts[i] for i in candidate_ids], line
                )
                reserve = 0
            else:
                user_text = text.with_request(text.user_prompt(self.prompt_template, texts), line)
            ids = self._encode(self.render_prompt(user_text))
            if len(ids) + reserve <= self.max_length:
                return ids
            if not window:
                raise self._too_long(len(ids) + reserve, line)
            if not self._warned_overflow:
                warnings.warn(
                    f"A prompt exceeded the model context ({self.max_length} tokens): dropping the "
                    "oldest history items to fit (shown once).",
                    stacklevel=2,
                )
                self._warned_overflow = True
            window = window[1:]

    def _too_long(self, needed: int, line: str | None) -> ValueError:
        if line is not None:
            return ValueError(
                f"request: too long for the model context: the prompt with it needs {needed} tokens even without "
                f"history, more than the limit {self.max_length} (llm_max_length); ask in fewer words"
            )
        template = "list_prompt_template" if self.prompt_format == "list" else "prompt_template"
        return ValueError(
            f"llm_max_length: the prompt needs {needed} tokens even without history, more than the limit "
            f"{self.max_length}; shorten {template} or use fewer candidates"
        )

    def list_prompt(self, window: list[int], reserve: int = 0, line: str | None = None) -> list[int]:
        """``prompt_format: list``: the header's tokens, then each item's own tokens (text and line
        break), so a training window and a prompt hold the very same tokens at the same positions.
        A request ``line`` goes before the header."""
        head = self.list_head if line is None else self._encode(f"{line}\n{self.list_header}")
        while len(head) + sum(len(self.item_token_ids[i]) for i in window) + reserve > self.max_length:
            if not window:
                raise self._too_long(len(head) + reserve, line)
            window = window[1:]
        return head + [t for i in window for t in self.item_token_ids[i]]

    def list_length(self, window: list[int]) -> int:
        """Tokens of the list prompt (or training row) of ``window``: the header, then each item's."""
        return len(self.list_head) + sum(len(self.item_token_ids[i]) for i in window)

    # ------------------------------------------------------------------ scoring
    def shared_prefix(self) -> scoring.SharedPrefix:
        """KV cache of the prompt tokens common to every user (computed once)."""
        if self._shared_prefix is None and self.prompt_format == "list":
            head = self.list_head
            self._shared_prefix = scoring.SharedPrefix(self.llm, head[: max(len(head) - 1, 1)])
        if self._shared_prefix is None:
            a = self._encode(self.render_prompt(text.user_prompt(self.prompt_template, ["x"])))
            b = self._encode(self.render_prompt(text.user_prompt(self.prompt_template, ["y"])))
            common = 0
            while common < min(len(a), len(b)) and a[common] == b[common]:
                common += 1
            # stop a token early: the boundary token may merge with the history text
            self._shared_prefix = scoring.SharedPrefix(self.llm, a[: max(common - 1, 1)])
        return self._shared_prefix

    def item_trie(self) -> generation.ItemTrie:
        """Prefix tree of every item's tokens (the same tokens the likelihood scorer uses)."""
        if self._trie is None:
            items = list(range(1, self.n_items))
            self._trie = generation.ItemTrie([self.item_token_ids[i] for i in items], items)
        return self._trie

    def generate_items(self, history: list[int]) -> list[tuple[int, float]]:
        """Catalogue items reached by constrained beam search, best first: (item id, score)."""
        return self.generate_items_batch([history])[0]

    def generate_items_batch(
        self, histories: list[list[int]], requests: list[str | None] | None = None
    ) -> list[list[tuple[int, float]]]:
        """:meth:`generate_items` for several users, ``generation_users_per_batch`` per forward pass."""
        longest = max(len(t) for t in self.item_token_ids[1:])
        requests = requests or [None] * len(histories)
        prompts = [self.build_prompt(h, reserve_tokens=longest, request=r) for h, r in zip(histories, requests)]
        found = []
        step = self.generation_users_per_batch
        for start in range(0, len(prompts), step):
            found.extend(
                generation.batched_constrained_beam_search(
                    self.llm,
                    prompts[start : start + step],
                    self.item_trie(),
                    self.num_beams,
                    self.tokenizer.pad_token_id,
                )
            )
        results = []
        for history, pairs in zip(histories, found):
            seen = {i for i in history if i}
            pairs = [(item, score) for item, score in pairs if item not in seen]
            if self.popularity_prior:
                prior = self.popularity_prior * torch.log1p(self.item_counts.float())
                pairs = sorted(((i, s + float(prior[i])) for i, s in pairs), key=lambda kv: (-kv[1], kv[0]))
            results.append(pairs)
        return results

    def score_candidates(self, history: list[int], candidate_ids: list[int], user_key: int = 0) -> torch.Tensor:
        """LLM scores of ``candidate_ids`` for one user's history. [K], higher is better."""
        return self.score_candidates_batch([history], [candidate_ids], [user_key])[0]

    def score_candidates_batch(
        self,
        histories: list[list[int]],
        candidate_lists: list[list[int]],
        user_keys: list[int] | None = None,
        requests: list[str | None] | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`score_candidates` for several users in few forward passes: one [K_u] per user.
        ``requests``: each user's own words, or None (see :meth:`build_prompt`).

        In evaluation the scores are kept until the weights change (training, loading a
        checkpoint): choosing the fusion weight on the valid split scores each user once."""
        user_keys = user_keys if user_keys is not None else [0] * len(histories)
        requests = requests if requests is not None else [None] * len(histories)
        if self.training or torch.is_grad_enabled():
            return self._score_uncached(histories, candidate_lists, user_keys, requests)
        keys = [(int(u), tuple(h), tuple(c), r) for u, h, c, r in zip(user_keys, histories, candidate_lists, requests)]
        todo = [i for i, key in enumerate(keys) if key not in self._score_cache]
        if todo:
            fresh = self._score_uncached(
                [histories[i] for i in todo],
                [candidate_lists[i] for i in todo],
                [user_keys[i] for i in todo],
                [requests[i] for i in todo],
            )
            self._score_cache.update({keys[i]: scores for i, scores in zip(todo, fresh)})
        return [self._score_cache[key] for key in keys]

    def _score_uncached(
        self,
        histories: list[list[int]],
        candidate_lists: list[list[int]],
        user_keys: list[int],
        requests: list[str | None] | None = None,
    ) -> list[torch.Tensor]:
        requests = requests if requests is not None else [None] * len(histories)
        if self.score_method in ("likelihood", "generate"):  # a beam's score is the likelihood
            prompts = [self.build_prompt(h, c, request=r) for h, c, r in zip(histories, candidate_lists, requests)]
            results = scoring.score_continuations(
                self.llm,
                prompts,
                [[self.item_token_ids[i] for i in c] for c in candidate_lists],
                shared=self.shared_prefix(),
                batch_tokens=self.llm_score_batch_tokens,
                pad_id=self.tokenizer.pad_token_id,
            )
        else:
            prompts, labels, orders = [], [], []
            for history, candidate_ids, user_key, request in zip(histories, candidate_lists, user_keys, requests):
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(user_key))
                for _ in range(self.verbalizer_permutations):
                    order = torch.randperm(len(candidate_ids), generator=generator).tolist()
                    prompts.append(self.build_prompt(history, [candidate_ids[i] for i in order], request=request))
                    labels.append(self.label_token_ids[: len(order)])
                    orders.append(order)
            label_scores = scoring.verbalizer_scores_batch(
                self.llm, prompts, labels, self.shared_prefix(), self.llm_score_batch_tokens
            )
            results, n = [], self.verbalizer_permutations
            for u, candidate_ids in enumerate(candidate_lists):
                scores = torch.zeros(len(candidate_ids))
                for k in range(u * n, (u + 1) * n):
                    scores[orders[k]] += label_scores[k]
                results.append(scores / n)
        if self.popularity_prior:
            results = [
                s + self.popularity_prior * torch.log1p(self.item_counts[c].float())
                for s, c in zip(results, candidate_lists)
            ]
        return results

    # ------------------------------------------------------------------ candidates
    def candidate_model(self):
        """The RecBole model proposing candidates (``candidate_source`` a model file or name)."""
        if self._candidate_model is None:
            if not self.candidate_model_file:
                raise ValueError(
                    f"candidate_source: {self.candidate_source!r} is trained by LLMGenTrainer.fit before "
                    "LLMGen runs; run fit first (RecBole's run_recbole does) or give a saved model file"
                )
            model = two_stage.load_candidate_model(
                self.candidate_model_file, self._candidate_config, self._candidate_dataset
            )
            object.__setattr__(self, "_candidate_model", model.to(self.device))  # never trained or saved with LLMGen
        return self._candidate_model

    def load_other_parameter(self, para) -> None:
        super().load_other_parameter(para)
        self._candidate_model = None  # a checkpoint may name another candidate model file

    def retrieval_scores(
        self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, interaction=None, mask: bool = True
    ) -> torch.Tensor:
        """Retriever scores for every item; padding and history items at -inf unless ``mask`` is
        off (a sampled protocol may list seen items among its negatives). [B, n_items]

        ``interaction`` (the batch) is needed when a RecBole model proposes the candidates.
        """
        histories = [row[:n].tolist() for row, n in zip(item_seq.cpu(), item_seq_len.cpu().tolist())]
        seen = histories
        if interaction is not None and self.USER_ID in interaction.interaction:
            # every training item of the user, as RecBole masks a general model's history (item_seq
            # holds only the last MAX_ITEM_LIST_LENGTH): a seen item is never a candidate
            users = interaction[self.USER_ID].cpu().tolist()
            seen = [h + self.training_items.get(int(u), []) for h, u in zip(histories, users)]
        if self.candidate_source == "pop":
            scores = cand.popularity_scores(self.item_counts, len(histories))
        elif self.candidate_kind != "builtin":
            if interaction is None:
                raise ValueError(f"retrieval_scores: candidate_source {self.candidate_source!r} needs the batch")
            scores = two_stage.candidate_scores(self.candidate_model(), interaction, self.device)
        else:
            windows = [h[-self.max_history_items :] for h in histories]
            scores = cand.text_scores(self.item_embeddings(), windows)
        return cand.mask_seen(scores, seen) if mask else scores

    def item_embeddings(self) -> torch.Tensor:
        if self._item_embeddings is None:
            self._item_embeddings = cand.encode_texts(self.text_encoder_path, self.item_texts)
        return self._item_embeddings

    # ------------------------------------------------------------------ RecBole contract
    def forward(self, item_seq, item_seq_len):
        raise NotImplementedError("LLMGen scores through predict/full_sort_predict")

    def calculate_loss(self, interaction) -> torch.Tensor:
        """Mean training loss of the batch's (history, target) rows; see :mod:`finetune`."""
        if self.train_mode == "none":
            raise RuntimeError(
                "train_mode: none is zero-shot: LLMGen has nothing to train. LLMGenTrainer skips "
                "training; use it (RecBole picks it by name) instead of a plain Trainer, or set "
                "train_mode: lora | full."
            )
        pad = self.tokenizer.pad_token_id
        if sequence.WINDOW_FIELD in interaction.interaction:
            return self.sequence_loss(interaction[sequence.WINDOW_FIELD], interaction[sequence.WINDOW_LEN_FIELD])
        item_seq = interaction[self.ITEM_SEQ].cpu()
        item_seq_len = interaction[self.ITEM_SEQ_LEN].cpu()
        targets = interaction[self.ITEM_ID].cpu().tolist()
        histories = [item_seq[b, : item_seq_len[b]].tolist() for b in range(len(targets))]
        if self.score_method == "verbalizer":
            shown, positions = self.training_candidates(item_seq, item_seq_len, targets, interaction)
            prompts = [self.build_prompt(h, s) for h, s in zip(histories, shown)]
            losses = finetune.label_cross_entropy(self.llm, prompts, self.label_token_ids, positions, pad)
        else:
            target_tokens = [self.item_token_ids[t] for t in targets]
            prompts = [self.build_prompt(h, reserve_tokens=len(t)) for h, t in zip(histories, target_tokens)]
            losses = finetune.target_token_nll(self.llm, prompts, target_tokens, pad)
        return losses.mean()

    def window_rows(self, windows: list[list[int]]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """List rows of training windows (header, then each item's tokens) and the [start, end)
        span of every item after the first: the items the window trains. A window longer than the
        context loses its oldest items."""
        head = self.list_head
        rows, spans = [], []
        for window in windows:
            while len(window) > 2 and self.list_length(window) > self.max_length:
                window = window[1:]
            tokens = [self.item_token_ids[i] for i in window]
            rows.append(head + [t for item in tokens for t in item])
            spans.append(finetune.item_spans(len(head), tokens)[1:])
        return rows, spans

    def sequence_loss(self, window: torch.Tensor, window_len: torch.Tensor) -> torch.Tensor:
        """``llm_train_objective: sequence``: mean over the batch's predicted items (every item of a
        window after its first) of the item's mean token loss as the list's next line."""
        windows = [row[:n].tolist() for row, n in zip(window.cpu(), window_len.cpu().tolist())]
        rows, spans = self.window_rows(windows)
        return finetune.sequence_item_nll(self.llm, rows, spans, self.tokenizer.pad_token_id).mean()

    def training_candidates(
        self, item_seq, item_seq_len, targets: list[int], interaction=None
    ) -> tuple[list[list[int]], list[int]]:
        """Verbalizer training lists: ``num_candidates - 1`` retrieved items (never the target or
        the history) with the target at a random position. Returns (lists, target positions)."""
        retrieval = self.retrieval_scores(item_seq, item_seq_len, interaction)
        rows = torch.arange(len(targets))
        retrieval[rows, torch.tensor(targets)] = -math.inf
        others = cand.top_candidates(retrieval, self.num_candidates - 1)
        shown, positions = [], []
        for b, target in enumerate(targets):
            items = [i for i in others[b].tolist() if retrieval[b, i] > -math.inf]
            position = int(torch.randint(len(items) + 1, (1,)))
            shown.append(items[:position] + [target] + items[position:])
            positions.append(position)
        return shown, positions

    def predict(self, interaction) -> torch.Tensor:
        """Scores of (user, item) rows; rows sharing a history share one prompt. [N]"""
        item_seq = interaction[self.ITEM_SEQ].cpu()
        item_seq_len = interaction[self.ITEM_SEQ_LEN].cpu()
        items = interaction[self.ITEM_ID].cpu()
        users = interaction[self.USER_ID].cpu() if self.USER_ID in interaction.interaction else None
        groups: dict[tuple, list[int]] = {}
        for row in range(len(items)):
            history = tuple(item_seq[row, : item_seq_len[row]].tolist())
            key = (int(users[row]) if users is not None else 0, history)
            groups.setdefault(key, []).append(row)
        scores = torch.empty(len(items))
        keys, ordered_ids, ordered_rows = [], [], []
        for (user, history), rows in groups.items():
            candidate_ids = [int(items[r]) for r in rows]
            ordered = sorted(range(len(rows)), key=lambda j: candidate_ids[j])  # canonical order
            keys.append((user, list(history)))
            ordered_ids.append([candidate_ids[j] for j in ordered])
            ordered_rows.append([rows[j] for j in ordered])
        weight = self.active_fusion_weight()
        if weight == 0.0:
            results = [torch.zeros(len(ids)) for ids in ordered_ids]
        else:
            results = self.score_candidates_batch([h for _, h in keys], ordered_ids, [u for u, _ in keys])
        if weight is not None:  # each user's sampled items are its candidate list
            retrieval = self.retrieval_scores(item_seq, item_seq_len, interaction, mask=False)
            side = self.candidate_side(retrieval[torch.arange(len(items)), items])
            results = [
                cand.fuse(result[None], side[rows][None], weight)[0] for result, rows in zip(results, ordered_rows)
            ]
        for result, rows in zip(results, ordered_rows):
            scores[rows] = result
        return scores.to(self.device)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        """LLM-scored candidates above every other item, the rest in retriever order. [B, n_items]"""
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        users = interaction[self.USER_ID].cpu() if self.USER_ID in interaction.interaction else None
        retrieval = self.retrieval_scores(item_seq, item_seq_len, interaction)  # [B, n_items]
        if self.score_method == "generate":
            return self._generate_full_sort(item_seq, item_seq_len, retrieval)
        candidate_ids = cand.top_candidates(retrieval, self.num_candidates)  # [B, K]
        weight = self.active_fusion_weight()
        llm_scores = torch.full(candidate_ids.shape, -math.inf)
        batch, histories, lists, keys = [], [], [], []
        for b in range(len(candidate_ids)):
            valid = candidate_ids[b][retrieval[b, candidate_ids[b]] > -math.inf].tolist()
            if valid and weight == 0.0:  # the candidate model's ranking: nothing for the LLM to add
                llm_scores[b, : len(valid)] = 0.0
            elif valid:
                batch.append(b)
                histories.append(item_seq[b, : item_seq_len[b]].tolist())
                lists.append(sorted(valid))  # canonical order, the same as predict's
                keys.append(int(users[b]) if users is not None else 0)
        results = self.score_candidates_batch(histories, lists, keys) if batch else []
        for b, ordered, result in zip(batch, lists, results):
            lookup = dict(zip(ordered, result.tolist()))
            n = len(ordered)
            llm_scores[b, :n] = torch.tensor([lookup[i] for i in candidate_ids[b][:n].tolist()])
        if weight is not None:
            side = self.candidate_side(retrieval.gather(1, candidate_ids))
            llm_scores = cand.fuse(llm_scores, side, weight)
        return cand.merge_scores(retrieval, candidate_ids, llm_scores).to(self.device)

    def candidate_side(self, retrieval_values: torch.Tensor) -> torch.Tensor:
        """The candidate model's own score of its candidates, as fusion uses it: pop the log of the
        training count, text the similarity, a RecBole model its ``full_sort_predict`` score."""
        return torch.log1p(retrieval_values.clamp(min=0)) if self.candidate_source == "pop" else retrieval_values

    def active_fusion_weight(self) -> float | None:
        """The LLM's weight in the fused score (None: no fusion, the LLM ranks the candidates)."""
        if self.score_fusion == "none":
            return None
        if self.fusion_weight is None:
            raise ValueError(
                "score_fusion: auto chooses its weight on the valid split, and no validation has run; train or "
                "fit with valid data (LLMGenTrainer.fit does), load a checkpoint that has it, or set a weight in [0, 1]"
            )
        return float(self.fusion_weight)

    @torch.no_grad()
    def generate_free_text(self, history: list[int]) -> list[str]:
        """``num_beams`` unconstrained generations (beam search), best first."""
        prompt = self.build_prompt(history, reserve_tokens=self.max_item_text_tokens)
        ids = torch.tensor([prompt], device=self.llm.device)
        newline = self.tokenizer.encode("\n", add_special_tokens=False)
        output = self.llm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.max_item_text_tokens,
            num_beams=self.num_beams,
            num_return_sequences=self.num_beams,
            do_sample=False,
            eos_token_id=[self.tokenizer.eos_token_id, *newline[-1:]],
            pad_token_id=self.tokenizer.pad_token_id,
        )
        texts = self.tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def ground(self, generations: list[str]) -> torch.Tensor:
        """Catalogue scores of free generations: the best cosine similarity to any of them, the
        earlier (better) generation winning ties. Counts exact catalogue texts. [n_items]"""
        exact = set(self.item_texts[1:])
        self.generation_stats["generations"] += len(generations)
        self.generation_stats["exact"] += sum(1 for g in generations if g in exact)
        embeddings = cand.encode_texts(self.text_encoder_path, ["", *generations])[1:]  # [G, d]
        similarity = embeddings @ self.item_embeddings().T  # [G, n_items]
        rank_penalty = 1e-4 * torch.arange(len(generations), dtype=similarity.dtype).unsqueeze(1)
        return (similarity - rank_penalty).max(dim=0).values

    def _generate_full_sort(self, item_seq, item_seq_len, retrieval) -> torch.Tensor:
        """Items the beams reached, by score, above all others (kept in retriever order). [B, n_items]"""
        if self.generation_constraint == "none":
            rows = []
            for b in range(len(item_seq)):
                history = item_seq[b, : item_seq_len[b]].tolist()
                rows.append(self.ground(self.generate_free_text(history)))
            grounded = cand.mask_seen(
                torch.stack(rows), [item_seq[b, : item_seq_len[b]].tolist() for b in range(len(item_seq))]
            )
            stats = self.generation_stats
            logger.info(
                "free generation: %d of %d generations were exact catalogue texts", stats["exact"], stats["generations"]
            )
            return grounded.to(self.device)
        found = self.generate_items_batch([item_seq[b, : item_seq_len[b]].tolist() for b in range(len(item_seq))])
        width = max(1, max(len(f) for f in found))
        candidate_ids = torch.zeros(len(found), width, dtype=torch.long)
        llm_scores = torch.full((len(found), width), -math.inf)
        for b, pairs in enumerate(found):
            if pairs:
                candidate_ids[b, : len(pairs)] = torch.tensor([i for i, _ in pairs])
                llm_scores[b, : len(pairs)] = torch.tensor([s for _, s in pairs])
        return cand.merge_scores(retrieval, candidate_ids, llm_scores).to(self.device)

    # ------------------------------------------------------------------ reporting
    def flops_estimate(self) -> int:
        """Rough FLOPs to score one user (2 x parameters x tokens processed)."""
        n_params = sum(p.numel() for p in self.llm.parameters())
        item_tokens = sum(len(t) for t in self.item_token_ids[1:]) / max(1, self.n_items - 1)
        prompt_tokens = 60 + self.max_history_items * (item_tokens + 3)
        scored = self.num_candidates * item_tokens if self.score_method == "likelihood" else 0
        return int(2 * n_params * (prompt_tokens + scored))

    def __str__(self) -> str:
        n_frozen = sum(p.numel() for p in self.llm.parameters() if not p.requires_grad)
        return (
            f"LLMGen(llm={type(self.llm).__name__} with {n_frozen / 1e6:.1f}M frozen parameters, "
            f"score_method={self.score_method}, candidate_source={self.candidate_source}, "
            f"num_candidates={self.num_candidates}, max_history_items={self.max_history_items}, "
            f"chat_template={self.use_chat}, train_mode={self.train_mode})\nTrainable parameters: "
            f"{sum(p.numel() for p in self.parameters() if p.requires_grad)}"
        )

"""Prompts: item texts from a RecBole dataset, their tokens, and the token ids of every prompt and
training row the LLM sees.

:func:`item_texts` renders each item's text from its ``.item`` fields; :class:`Prompter` tokenizes
them once and builds prompts (``prompt_format: chat`` or ``list``) and list rows for training. The
wording lives in :mod:`recbole_llmgen.text` (pure functions); this module turns it into token ids
for one tokenizer and context length.
"""

from __future__ import annotations

import os
import warnings

from recbole_llmgen import finetune, text
from recbole_llmgen.settings import LLMGenSettings


def read_atomic_header(path: str) -> list[str]:
    """Field names (without ``:type``) of a RecBole atomic file, or [] when it does not exist."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    return [column.split(":")[0] for column in header]


def field_strings(dataset, field: str) -> list[str]:
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


def item_texts(config, dataset, fields, template: str | None) -> list[str]:
    """Each item's text, index = inner item id (0, padding: ""), from ``item_text_fields`` rendered
    with ``item_text_template``. A field that is missing or not loaded is named with the fix."""
    item_id = dataset.iid_field
    available = list(dataset.item_feat.columns) if dataset.item_feat is not None else []
    data_file = os.path.join(config["data_path"], f"{config['dataset']}.item")
    in_file = read_atomic_header(data_file)
    if fields == "auto":
        fields = text.default_text_fields(in_file or available, item_id)
    if isinstance(fields, str):
        fields = [fields]
    missing = [f for f in fields if f not in available]
    if missing:
        if not in_file:
            where = f"there is no item file {data_file}"
        elif all(f in in_file for f in missing):
            where = (
                f"they are in {data_file} but not loaded: add them to load_col, e.g. "
                f"load_col: {{item: {[item_id, *fields]}}}"
            )
        else:
            where = f"item fields that exist: {[f for f in in_file if f != item_id]}"
        raise ValueError(f"item_text_fields: {missing} not found among the loaded item fields; {where}")
    template = template or text.default_template(fields)
    unknown = [f for f in text.template_fields(template) if f not in available]
    if unknown:
        raise ValueError(f"item_text_template: {template!r} names {unknown}, not loaded item fields {available}")
    columns = {f: field_strings(dataset, f) for f in text.template_fields(template)}
    tokens = dataset.field2id_token[item_id]
    texts = [""] + [
        text.render_item_text(template, {f: columns[f][i] for f in columns}) for i in range(1, dataset.item_num)
    ]
    return text.fill_empty_texts(texts, tokens, f"item_text_fields {fields}")


class Prompter:
    """Token ids of prompts and list rows for one tokenizer and context length.

    ``item_token_ids[i]``: item i's tokens as they continue a prompt (cut to
    ``max_item_text_tokens``); the same ids the scorer scores, the generator spells and training
    predicts.
    """

    def __init__(self, settings: LLMGenSettings, tokenizer, texts: list[str], context_length: int):
        self.settings = settings
        self.tokenizer = tokenizer
        self.item_texts = texts
        has_template = getattr(tokenizer, "chat_template", None) is not None
        use_chat = settings.use_chat_template
        self.use_chat = has_template if use_chat in ("auto", None) else bool(use_chat)
        if settings.prompt_format == "list":
            self.use_chat = False  # a plain text list the model continues, no chat turn
        if self.use_chat and not has_template:
            raise ValueError(
                f"use_chat_template: True, but the tokenizer of {settings.llm_path!r} has no chat template"
            )
        self.max_length = int(settings.llm_max_length or context_length)
        # list format: the header's tokens, once (every prompt and training row starts with them)
        self.list_head = self.encode(settings.list_header) if settings.prompt_format == "list" else None
        self.item_token_ids = self._tokenize_items()
        self.label_token_ids = self.label_tokens() if settings.score_method == "verbalizer" else None
        self._warned_overflow = False

    @property
    def longest_item(self) -> int:
        return max(len(t) for t in self.item_token_ids[1:])

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt (special tokens as the prompt format needs them)."""
        return self.tokenizer(prompt, add_special_tokens=not self.use_chat)["input_ids"]

    def _tokenize_items(self) -> list[list[int]]:
        """Token ids of each item text as it continues the prompt, cut to max_item_text_tokens.

        ``prompt_format: list``: the text and its line break (the item's end is part of what is
        scored: "Heat" is not "Heat 2"), the line break kept when the text is cut."""
        limit = self.settings.max_item_text_tokens
        if self.settings.prompt_format == "list":
            newline = self.tokenizer.encode("\n", add_special_tokens=False)[-1:]
            encoded = self.tokenizer([t + "\n" for t in self.item_texts], add_special_tokens=False)["input_ids"]
            return [list(ids) if len(ids) <= limit else list(ids[: limit - 1]) + newline for ids in encoded]
        prefix = "" if self.use_chat else " "
        encoded = self.tokenizer([prefix + t for t in self.item_texts], add_special_tokens=False)["input_ids"]
        return [list(ids[:limit]) for ids in encoded]

    def label_tokens(self) -> list[int]:
        """The single-token labels A, B, ... of the verbalizer's candidate list."""
        prefix = "" if self.use_chat else " "
        ids = []
        for label in text.LABELS:
            encoded = self.tokenizer.encode(prefix + label, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"score_method: verbalizer needs single-token labels; {label!r} is {encoded}")
            ids.append(encoded[0])
        return ids

    def render(self, user_text: str) -> str:
        """The user text as the model reads it: a chat turn, or plain text with an answer cue."""
        s = self.settings
        if self.use_chat:
            messages = [{"role": "user", "content": user_text}]
            if s.system_prompt:
                messages.insert(0, {"role": "system", "content": s.system_prompt})
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        head = f"{s.system_prompt}\n\n" if s.system_prompt else ""
        tail = "\nAnswer:" if s.score_method == "verbalizer" else "\nRecommendation:"
        return head + user_text + tail

    def build(
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
        s = self.settings
        window = [i for i in history if i != 0][-s.max_history_items :]
        reserve = reserve_tokens if candidate_ids is None else max(len(self.item_token_ids[i]) for i in candidate_ids)
        line = text.request_line(s.request_template, request) if request is not None else None
        if s.prompt_format == "list":
            return self.list_prompt(window, reserve, line)
        while True:
            texts = [self.item_texts[i] for i in window]
            if s.score_method == "verbalizer" and candidate_ids is not None:
                shown = [self.item_texts[i] for i in candidate_ids]
                user_text = text.verbalizer_prompt(s.prompt_template, texts, shown, line)
                reserve = 0
            else:
                user_text = text.with_request(text.user_prompt(s.prompt_template, texts), line)
            ids = self.encode(self.render(user_text))
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
        template = "list_prompt_template" if self.settings.prompt_format == "list" else "prompt_template"
        return ValueError(
            f"llm_max_length: the prompt needs {needed} tokens even without history, more than the limit "
            f"{self.max_length}; shorten {template} or use fewer candidates"
        )

    def list_prompt(self, window: list[int], reserve: int = 0, line: str | None = None) -> list[int]:
        """``prompt_format: list``: the header's tokens, then each item's own tokens (text and line
        break), so a training window and a prompt hold the very same tokens at the same positions.
        A request ``line`` goes before the header."""
        head = self.list_head if line is None else self.encode(f"{line}\n{self.settings.list_header}")
        while len(head) + sum(len(self.item_token_ids[i]) for i in window) + reserve > self.max_length:
            if not window:
                raise self._too_long(len(head) + reserve, line)
            window = window[1:]
        return head + [t for i in window for t in self.item_token_ids[i]]

    def list_length(self, window: list[int]) -> int:
        """Tokens of the list prompt (or training row) of ``window``: the header, then each item's."""
        return len(self.list_head) + sum(len(self.item_token_ids[i]) for i in window)

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

    def common_head(self) -> list[int]:
        """The prompt tokens every user's prompt starts with (the shared prefix the scorer caches)."""
        if self.settings.prompt_format == "list":
            return self.list_head[: max(len(self.list_head) - 1, 1)]
        template = self.settings.prompt_template
        a = self.encode(self.render(text.user_prompt(template, ["x"])))
        b = self.encode(self.render(text.user_prompt(template, ["y"])))
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        return a[: max(common - 1, 1)]  # stop a token early: the boundary token may merge with the history text

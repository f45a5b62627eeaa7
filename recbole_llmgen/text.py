"""Item texts and prompts: small pure functions, testable without RecBole or an LLM."""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Sequence

TITLE_HINTS = ("title", "name")
YEAR_HINTS = ("year", "date")
PLACEHOLDER = "Item {token}"


def default_text_fields(available: Sequence[str], item_id_field: str) -> list[str]:
    """The title-like field, plus a year-like field when there is one.

    Raises ``ValueError`` naming the available fields when no title-like field exists.
    """
    candidates = [f for f in available if f != item_id_field]
    titles = [f for f in candidates if any(h in f.lower() for h in TITLE_HINTS)]
    if not titles:
        raise ValueError(
            "item_text_fields: 'auto' found no title-like field (a name containing "
            f"{' or '.join(repr(h) for h in TITLE_HINTS)}) among the item fields {list(candidates)}. "
            "Set item_text_fields to the fields that describe an item, e.g. "
            f"item_text_fields: [{candidates[0] if candidates else 'title'}]"
        )
    fields = [titles[0]]
    years = [f for f in candidates if any(h in f.lower() for h in YEAR_HINTS) and f not in fields]
    if years:
        fields.append(years[0])
    return fields


def default_template(fields: Sequence[str]) -> str:
    """ "{title} ({year})" for a title plus a year-like field, else the fields joined by ", "."""
    if len(fields) == 2 and any(h in fields[1].lower() for h in YEAR_HINTS):
        return "{%s} ({%s})" % (fields[0], fields[1])
    return ", ".join("{%s}" % f for f in fields)


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_item_text(template: str, values: dict[str, str]) -> str:
    """Fill ``template`` with field values; empty fields leave no dangling punctuation."""
    text = template.format(**values)
    text = re.sub(r"\(\s*\)|\[\s*\]", "", text)  # "Title ()" when the year is missing
    text = re.sub(r"\s+", " ", text).strip(" ,;:-")
    return text


def fill_empty_texts(texts: list[str], tokens: Sequence[str], field_desc: str) -> list[str]:
    """Replace empty texts by a readable placeholder, warning once; fail if every text is empty.

    ``texts[0]`` is RecBole's padding item and is ignored.
    """
    empty = [i for i in range(1, len(texts)) if not texts[i]]
    if empty and len(empty) == len(texts) - 1:
        raise ValueError(
            f"item_text_fields: every item has an empty text from {field_desc}; "
            "choose fields that hold item titles or descriptions."
        )
    if empty:
        examples = ", ".join(str(tokens[i]) for i in empty[:5])
        warnings.warn(
            f"{len(empty)} item(s) have an empty text from {field_desc} (e.g. item ids "
            f"{examples}); using the placeholder {PLACEHOLDER.format(token='<id>')!r} for them.",
            stacklevel=2,
        )
        texts = list(texts)
        for i in empty:
            texts[i] = PLACEHOLDER.format(token=tokens[i])
    return texts


def format_history(item_texts: Sequence[str]) -> str:
    """Numbered history lines, oldest first (the most recent item is last)."""
    return "\n".join(f"{i}. {text}" for i, text in enumerate(item_texts, start=1))


def user_prompt(template: str, history_texts: Sequence[str]) -> str:
    return template.replace("{history}", format_history(history_texts))


LABELS = string.ascii_uppercase


CHAT_COMMANDS = "like N, dislike N, more like N, not this kind, why N, help, quit"
CHAT_HELP = (
    f"Type what you would like (e.g. 'a funny movie about space'), or feedback on the last list: {CHAT_COMMANDS}. "
    "Liked items join your history; disliked and shown ones are not proposed again."
)


def request_line(template: str, request: str) -> str:
    """The user's own words as one prompt line (``request_template`` with ``{request}`` filled)."""
    if "{request}" not in (template or ""):
        raise ValueError(f"request_template: must contain '{{request}}', got {template!r}")
    words = " ".join(str(request).split())
    if not words:
        raise ValueError("request: empty; say what you would like, e.g. 'a funny movie about space'")
    return template.replace("{request}", words)


def with_request(user_text: str, line: str | None) -> str:
    """The chat prompt with the request after the history (the question the answer responds to)."""
    return user_text if not line else f"{user_text}\n{line}"


def verbalizer_prompt(
    template: str, history_texts: Sequence[str], candidates: Sequence[str], request: str | None = None
) -> str:
    """The user prompt (and the request line) with lettered candidates appended, asking for one letter."""
    if len(candidates) > len(LABELS):
        raise ValueError(
            f"score_method: verbalizer labels candidates with letters and supports at most "
            f"{len(LABELS)} candidates, got {len(candidates)}. Use score_method: likelihood "
            "or fewer candidates (num_candidates, or a smaller sampled protocol)."
        )
    listing = "\n".join(f"{LABELS[i]}. {text}" for i, text in enumerate(candidates))
    return (
        f"{with_request(user_prompt(template, history_texts), request)}\nCandidates:\n{listing}\n"
        "Answer with the letter of the best candidate only."
    )


PROMPT_FORMATS = ("chat", "list")


def list_header(template: str) -> str:
    """The text before the history of a list-continuation template (``prompt_format: list``).

    The history is the list itself, one item text per line, so the template must end with
    ``{history}`` and the header before it with a line break: then the next item begins exactly
    where the prompt ends and a candidate is scored as the list's next line.
    """
    if not isinstance(template, str) or not template.endswith("{history}") or template.count("{history}") != 1:
        raise ValueError(
            f"list_prompt_template: {template!r} does not end where the next item begins; with prompt_format: list "
            "it must end with '{history}' (the item list, one text per line), e.g. "
            "'Movies a user watched, oldest first, one per line:\\n{history}'"
        )
    header = template[: -len("{history}")]
    if not header.endswith("\n"):
        raise ValueError(
            f"list_prompt_template: {template!r} must have a line break right before '{{history}}' "
            "(each item of the list starts a line), e.g. 'Movies watched:\\n{history}'"
        )
    return header

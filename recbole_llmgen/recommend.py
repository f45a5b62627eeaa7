"""Per-user recommendations (with optional explanations) from a config or a saved model file."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import pandas as pd
import torch

from recbole_llmgen import candidates as cand
from recbole_llmgen import text
from recbole_llmgen.feedback import verdicts_by_user, with_trained
from recbole_llmgen.integration import load_model, user_histories
from recbole_llmgen.requests import score_requests

COLUMNS = ["user_id", "rank", "item_id", "item_text", "score", "explanation"]
EXPLAIN_PROMPT = (
    "{history_prompt}\n\nThe recommendation is: {item}.\n"
    "In one or two sentences, explain why this fits the user's history."
)
EXPLAIN_REQUEST_PROMPT = (
    "{history_prompt}\n{request_line}\n\nThe recommendation is: {item}.\n"
    "In one or two sentences, explain why this fits what the user asks for and their history."
)
NEW_USER = "new-user"  # the user_id of rows for a request without a user


def recommend(
    users: Sequence[str] | str | None,
    topk: int = 10,
    dataset: str | None = None,
    config_file_list: list[str] | None = None,
    config_dict: dict | None = None,
    model_file: str | None = None,
    explain: bool = False,
    model: str = "LLMGen",
    max_explanation_tokens: int = 60,
    request: str | None = None,
    feedback: list[str] | None = None,
) -> pd.DataFrame:
    """Top-``topk`` items for each user (original dataset ids), best first.

    Rows: ``user_id, rank, item_id, item_text, score, explanation`` (ids are the dataset's own
    tokens). The history is the user's whole interaction history in the dataset (the prompt uses
    its most recent ``max_history_items``). ``explain=True`` asks the LLM, after the ranking is
    fixed, for one or two sentences per item; explanations never change the ranking.

    ``request``: what the user asks for now, in their own words ("a funny movie about space"): it
    goes into the prompt and widens the candidates (:func:`recbole_llmgen.requests.rank_for_request`).
    ``users=None`` with a request: a new user without history (rows named ``new-user``).
    ``feedback``: feedback files of earlier chats (:func:`recbole_llmgen.feedback.verdicts_by_user`):
    each user's liked items join their history, disliked items are never recommended; a new user's
    (``new-user`` rows) build their history from nothing. A model trained with ``feedback`` files
    (``run --feedback``) adds those that still exist.
    """
    if isinstance(users, str):
        users = [users]
    if topk < 1:
        raise ValueError(f"topk: expected an integer >= 1, got {topk}")
    if request is not None:
        text.request_line("{request}", request)  # empty: a named error before the model loads
    elif not users:
        raise ValueError("users: give at least one user id (or a request, for a new user without history)")
    users = list(users or [])
    config, rec, full = load_model(model, dataset, config_file_list, config_dict, model_file)
    uid, iid = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    known = full.field2token_id[uid]
    unknown = [u for u in map(str, users) if u not in known]
    if unknown:
        sample = ", ".join(list(known)[1:6])
        raise ValueError(
            f"user_id: {unknown} not in dataset {config['dataset']!r} ({len(known) - 1} users, e.g. {sample})"
        )
    inner = [known[str(u)] for u in users]
    histories = user_histories(full, inner, uid, iid, config["TIME_FIELD"])
    disliked: dict = {}
    feedback = with_trained(feedback, config)  # and the feedback the model was trained on (run --feedback)
    if feedback:
        verdicts = verdicts_by_user(feedback, full.field2token_id[iid])  # the files read once, for every user
        for user, u in [*zip(map(str, users), inner), *([] if users else [(NEW_USER, None)])]:
            liked, disliked[u] = verdicts.get(user, ([], set()))
            history = histories.setdefault(u, [])
            history.extend(i for i in liked if i not in history)
    if request is not None:
        return _recommend_for_request(rec, full, iid, users, inner, histories, request, topk, explain,
                                      max_explanation_tokens, disliked)  # fmt: skip
    empty = [u for u, i in zip(users, inner) if not histories[i]]
    if empty:
        raise ValueError(
            f"user_id: {empty} have no interactions in {config['dataset']!r}: nothing to base a recommendation on"
        )
    max_len = config["MAX_ITEM_LIST_LENGTH"]
    seqs = torch.zeros(len(inner), max_len, dtype=torch.long)
    lens = torch.zeros(len(inner), dtype=torch.long)
    for row, u in enumerate(inner):
        history = histories[u][-max_len:]
        seqs[row, : len(history)] = torch.tensor(history)
        lens[row] = len(history)
    from recbole.data.interaction import Interaction

    fields = {uid: torch.tensor(inner)}
    if hasattr(rec, "ITEM_SEQ"):  # a sequential model (LLMGen, SASRec...) reads the history; a general one its user
        fields.update({rec.ITEM_SEQ: seqs, rec.ITEM_SEQ_LEN: lens})
    rec.eval()
    with torch.no_grad():
        scores = rec.full_sort_predict(Interaction(fields).to(config["device"])).cpu().view(len(inner), -1)
    # never proposed: padding, what the user has seen (or liked), what the user disliked before
    scores = cand.mask_seen(scores, [[*histories[u], *disliked.get(u, ())] for u in inner])
    rows = []
    texts = rec.item_texts if hasattr(rec, "item_texts") else file_item_texts(config, full)
    for row, (user, u) in enumerate(zip(users, inner)):
        values, items = torch.topk(scores[row], min(topk, rec.n_items - 1))
        for rank, (value, item) in enumerate(zip(values.tolist(), items.tolist()), start=1):
            if value == -math.inf:
                break
            item_text = texts.get(str(full.id2token(iid, item)), "") if isinstance(texts, dict) else texts[item]
            explanation = explain_item(rec, histories[u], item, max_explanation_tokens) if explain else ""
            rows.append([str(user), rank, str(full.id2token(iid, item)), item_text, float(value), explanation])
    return pd.DataFrame(rows, columns=COLUMNS)


def file_item_texts(config, full) -> dict[str, str]:
    """``{item token: text}`` from the dataset's ``.item`` file (its title and year fields), for a
    classic model whose data loads no item text; empty when there is no such file or field."""
    path = os.path.join(config["data_path"], f"{config['dataset']}.item")
    if not os.path.isfile(path):
        return {}
    items = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    columns = {c.split(":")[0]: c for c in items.columns}
    iid = config["ITEM_ID_FIELD"]
    try:
        fields = text.default_text_fields(list(columns), iid)
    except ValueError:  # no title-like field: the ids alone
        return {}
    template = text.default_template(fields)
    return {
        row[columns[iid]]: text.render_item_text(template, {f: row[columns[f]] for f in fields})
        for _, row in items.iterrows()
    }


def _recommend_for_request(
    rec, full, iid, users, inner, histories, request, topk, explain, max_explanation_tokens, disliked=None
) -> pd.DataFrame:
    """Rows for ``request``: every user's list in one batch (no users: one new user, with the history
    its feedback gave it or none); items a user disliked before are left out."""
    disliked = disliked or {}
    pairs = [(str(u), i, histories[i]) for u, i in zip(users, inner)] or [(NEW_USER, None, histories.get(None, []))]
    scored = score_requests(rec, [h for *_, h in pairs], [request] * len(pairs), [i for _, i, _ in pairs],
                            llm_for_requests=rec.settings.request_weight < 1)  # fmt: skip
    rows = []
    for (user, u, history), lists in zip(pairs, scored):
        blocked = disliked.get(u, set())
        ranked = lists.ranked(rec.settings.request_weight, rec.settings.request_focus, topk + len(blocked))
        for rank, (item, score) in enumerate([p for p in ranked if p[0] not in blocked][:topk], start=1):
            explanation = explain_item(rec, history, item, max_explanation_tokens, request) if explain else ""
            rows.append([user, rank, str(full.id2token(iid, item)), rec.item_texts[item], score, explanation])
    return pd.DataFrame(rows, columns=COLUMNS)


@torch.no_grad()
def explain_item(rec, history: list[int], item: int, max_new_tokens: int = 60, request: str | None = None) -> str:
    """One or two sentences from the LLM on why ``item`` fits ``history`` (and the request), greedy."""
    settings = rec.settings
    window = [i for i in history if i][-settings.max_history_items :]
    history_prompt = text.user_prompt(settings.prompt_template, [rec.item_texts[i] for i in window])
    if request is None:
        user_text = EXPLAIN_PROMPT.format(history_prompt=history_prompt, item=rec.item_texts[item])
    else:
        line = text.request_line(settings.request_template, request)
        user_text = EXPLAIN_REQUEST_PROMPT.format(
            history_prompt=history_prompt, request_line=line, item=rec.item_texts[item]
        )
    ids = torch.tensor([rec.prompts.encode(rec.prompts.render(user_text))], device=rec.llm.device)
    tokenizer = rec.tokenizer
    output = rec.llm.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        no_repeat_ngram_size=3,  # small models loop otherwise
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generated = " ".join(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).split())
    if first_sentences(generated, 2):
        return first_sentences(generated, 2)
    if request is not None:
        return f"It matches the request: {' '.join(request.split())}."
    return f"It is close to {rec.item_texts[window[-1]]}, which the user chose recently."


def first_sentences(text: str, n: int) -> str:
    """The first ``n`` sentences of ``text`` (all of it when it has fewer)."""
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return " ".join(parts[:n]).strip()


def format_table(frame: pd.DataFrame) -> str:
    """A readable table: one block per user."""
    lines = []
    for user, group in frame.groupby("user_id", sort=False):
        lines.append(f"user {user}")
        for r in group.itertuples(index=False):
            lines.append(f"  {r.rank:>3}. {r.item_text}  [item {r.item_id}, score {r.score:.3f}]")
            if r.explanation:
                lines.append(f"       why: {r.explanation}")
    return "\n".join(lines)

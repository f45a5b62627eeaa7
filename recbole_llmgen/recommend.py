"""Per-user recommendations (with optional explanations) from a config or a saved model file."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pandas as pd
import torch

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


def _load(model, dataset, config_file_list, config_dict, model_file):
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.quick_start import load_data_and_model
    from recbole.utils import get_model, init_seed

    if model_file is not None:
        config, model_obj, full, *_ = load_data_and_model(model_file)
        if dataset is not None and dataset != config["dataset"]:
            raise ValueError(
                f"model_file: {model_file} was trained on dataset {config['dataset']!r}, not {dataset!r}; "
                f"use --dataset {config['dataset']} or a model file of {dataset!r}"
            )
        return config, model_obj, full
    if dataset is None:
        raise ValueError("dataset: give a dataset name (or a model_file to take it from)")
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    full = create_dataset(config)
    train_data, _, _ = data_preparation(config, full)
    model_obj = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    return config, model_obj, full


def _histories(full, user_ids: list[int], uid_field: str, iid_field: str, time_field: str | None):
    """Each user's whole history in the filtered dataset, oldest first."""
    inter = full.inter_feat
    users = inter[uid_field].numpy()
    items = inter[iid_field].numpy()
    order = range(len(users))
    if time_field and time_field in inter.interaction:
        times = inter[time_field].numpy()
        order = sorted(order, key=lambda r: (times[r], r))
    wanted = set(user_ids)
    histories = {u: [] for u in user_ids}
    for r in order:
        if users[r] in wanted:
            histories[int(users[r])].append(int(items[r]))
    return histories


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
) -> pd.DataFrame:
    """Top-``topk`` items for each user (original dataset ids), best first.

    Rows: ``user_id, rank, item_id, item_text, score, explanation`` (ids are the dataset's own
    tokens). The history is the user's whole interaction history in the dataset (the prompt uses
    its most recent ``max_history_items``). ``explain=True`` asks the LLM, after the ranking is
    fixed, for one or two sentences per item; explanations never change the ranking.

    ``request``: what the user asks for now, in their own words ("a funny movie about space"): it
    goes into the prompt and widens the candidates (:func:`recbole_llmgen.conversation.rank_for_request`).
    ``users=None`` with a request: a new user without history (rows named ``new-user``).
    """
    if isinstance(users, str):
        users = [users]
    if topk < 1:
        raise ValueError(f"topk: expected an integer >= 1, got {topk}")
    if request is not None:
        from recbole_llmgen import text

        text.request_line("{request}", request)  # empty: a named error before the model loads
    elif not users:
        raise ValueError("users: give at least one user id (or a request, for a new user without history)")
    users = list(users or [])
    config, rec, full = _load(model, dataset, config_file_list, config_dict, model_file)
    uid, iid = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    known = full.field2token_id[uid]
    unknown = [u for u in map(str, users) if u not in known]
    if unknown:
        sample = ", ".join(list(known)[1:6])
        raise ValueError(
            f"user_id: {unknown} not in dataset {config['dataset']!r} ({len(known) - 1} users, e.g. {sample})"
        )
    inner = [known[str(u)] for u in users]
    histories = _histories(full, inner, uid, iid, config["TIME_FIELD"])
    if request is not None:
        return _recommend_for_request(rec, full, iid, users, inner, histories, request, topk, explain,
                                      max_explanation_tokens)  # fmt: skip
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

    interaction = Interaction({uid: torch.tensor(inner), rec.ITEM_SEQ: seqs, rec.ITEM_SEQ_LEN: lens}).to(
        config["device"]
    )
    rec.eval()
    with torch.no_grad():
        scores = rec.full_sort_predict(interaction).cpu()  # [B, n_items]
    scores[:, 0] = -math.inf
    rows = []
    for row, (user, u) in enumerate(zip(users, inner)):
        values, items = torch.topk(scores[row], min(topk, rec.n_items - 1))
        for rank, (value, item) in enumerate(zip(values.tolist(), items.tolist()), start=1):
            if value == -math.inf:
                break
            text = rec.item_texts[item] if hasattr(rec, "item_texts") else ""
            explanation = explain_item(rec, histories[u], item, max_explanation_tokens) if explain else ""
            rows.append([str(user), rank, str(full.id2token(iid, item)), text, float(value), explanation])
    return pd.DataFrame(rows, columns=COLUMNS)


def _recommend_for_request(
    rec, full, iid, users, inner, histories, request, topk, explain, max_explanation_tokens
) -> pd.DataFrame:
    """Rows for ``request``: every user's list in one batch (no users: one new user, no history)."""
    from recbole_llmgen.conversation import score_requests

    pairs = [(str(u), i, histories[i]) for u, i in zip(users, inner)] or [(NEW_USER, None, [])]
    scored = score_requests(rec, [h for *_, h in pairs], [request] * len(pairs), [i for _, i, _ in pairs],
                            llm_for_requests=rec.request_weight < 1)  # fmt: skip
    rows = []
    for (user, _, history), lists in zip(pairs, scored):
        for rank, (item, score) in enumerate(lists.ranked(rec.request_weight, rec.request_focus, topk), start=1):
            explanation = explain_item(rec, history, item, max_explanation_tokens, request) if explain else ""
            rows.append([user, rank, str(full.id2token(iid, item)), rec.item_texts[item], score, explanation])
    return pd.DataFrame(rows, columns=COLUMNS)


@torch.no_grad()
def explain_item(rec, history: list[int], item: int, max_new_tokens: int = 60, request: str | None = None) -> str:
    """One or two sentences from the LLM on why ``item`` fits ``history`` (and the request), greedy."""
    from recbole_llmgen import text

    window = [i for i in history if i][-rec.max_history_items :]
    history_prompt = text.user_prompt(rec.prompt_template, [rec.item_texts[i] for i in window])
    if request is None:
        user_text = EXPLAIN_PROMPT.format(history_prompt=history_prompt, item=rec.item_texts[item])
    else:
        line = text.request_line(rec.request_template, request)
        user_text = EXPLAIN_REQUEST_PROMPT.format(
            history_prompt=history_prompt, request_line=line, item=rec.item_texts[item]
        )
    prompt = rec.render_prompt(user_text)
    ids = torch.tensor([rec._encode(prompt)], device=rec.llm.device)
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

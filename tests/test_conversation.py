"""A request in the user's own words, and a session that learns from feedback (issue 15)."""

import io
import os
import sys

import pytest
from conftest import bench_overrides, build

from recbole_llmgen import text
from recbole_llmgen.cli import main
from recbole_llmgen.conversation import Session
from recbole_llmgen.recommend import recommend
from recbole_llmgen.requests import rank_for_request

REQUEST = "a funny movie about space"


def _session(toy_config_dict, user="u1", **extra):
    config, model, _, _, _ = build({**toy_config_dict, **extra})
    from recbole.data import create_dataset

    full = create_dataset(config)
    full.build()  # interactions as RecBole's loaders hold them (what recommend and chat load)
    return Session(model, full, config, user=user, topk=4)


def test_request_goes_into_every_prompt_format(toy_config_dict, tokenizer):
    _, chat, *_ = build(toy_config_dict)
    history = [3, 5, 7]
    with_request = tokenizer.decode(chat.prompts.build(history, [2, 4], request=REQUEST))
    without = tokenizer.decode(chat.prompts.build(history, [2, 4]))
    line = text.request_line(chat.settings.request_template, REQUEST)
    assert line not in without and line in with_request
    assert with_request.index(chat.item_texts[7]) < with_request.index(line)  # after the history

    _, listed, *_ = build({**toy_config_dict, "prompt_format": "list"})
    ids = listed.prompts.build(history, [2, 4], request=REQUEST)
    head = listed.prompts.encode(f"{line}\n{listed.settings.list_header}")
    # the request line before the header; the list still ends where the next item begins
    assert ids == head + [t for i in history for t in listed.prompts.item_token_ids[i]]

    _, verbal, *_ = build({**toy_config_dict, "score_method": "verbalizer"})
    decoded = tokenizer.decode(verbal.prompts.build(history, [2, 4], request=REQUEST))
    assert decoded.index(line) < decoded.index("Candidates:")


def test_request_changes_scores_and_is_part_of_the_cache_key(toy_config_dict):
    _, model, *_ = build(toy_config_dict)
    model.eval()
    history, candidates = [3, 5, 7], [2, 4, 6, 8]
    plain = model.scorer.score([history], [candidates])[0]
    asked = model.scorer.score([history], [candidates], requests=[REQUEST])[0]
    assert not plain.allclose(asked)
    reference = model.scorer.score([history], [candidates], [0], [REQUEST])[0]  # no cache: computed afresh
    assert asked.allclose(reference)
    generated = model.generator.items([history], requests=[REQUEST])[0]
    assert generated and all(i not in history for i, _ in generated)


def test_bad_requests_are_named(toy_config_dict):
    _, model, *_ = build({**toy_config_dict, "llm_max_length": 60})
    with pytest.raises(ValueError, match="request: empty; say what you would like"):
        model.prompts.build([3], [2], request="   ")
    with pytest.raises(ValueError, match=r"request: too long for the model context: .* more than the limit 60"):
        model.prompts.build([3], [2], request="space " * 80)
    with pytest.raises(ValueError, match="request_template: must contain '{request}'"):
        build({**toy_config_dict, "request_template": "The user asks:"})
    with pytest.raises(ValueError, match=r"request_weight: expected a number in \[0, 1\]"):
        build({**toy_config_dict, "request_weight": 2})
    with pytest.raises(ValueError, match="request_focus: expected a number >= 0"):
        build({**toy_config_dict, "request_focus": -1})


def test_request_retriever_reads_other_item_fields(toy_config_dict, toy_root):
    path = toy_root / "toy" / "toy.item"
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    genres = ["Comedy Sci-Fi" if k % 3 == 0 else "Drama" for k in range(len(lines))]
    path.write_text(
        "\n".join([header + "\tgenre:token_seq", *(f"{line}\t{g}" for line, g in zip(lines, genres))]) + "\n",
        encoding="utf-8",
    )
    _, model, *_ = build(toy_config_dict)
    described = model.retriever.item_descriptions()
    assert described[1].startswith(model.item_texts[1] + ". ")
    assert {d.split(". ")[-1] for d in described[1:]} == {"Comedy, Sci-Fi", "Drama"} or {
        d.split(". ")[-1] for d in described[1:]
    } == {"Comedy Sci-Fi", "Drama"}
    # request only (a new user): the retriever brings the requested genre; same inputs, same list
    model.settings.request_weight, model.settings.request_focus = 1.0, 100.0  # the request's similarity decides
    first = rank_for_request(model, [], "a comedy science fiction film", topk=5)
    assert first == rank_for_request(model, [], "a comedy science fiction film", topk=5)
    assert all("Comedy" in described[i] for i, _ in first)


def test_session_feedback_changes_the_next_list(toy_config_dict, tmp_path):
    session = _session(toy_config_dict)
    assert session.model.settings.request_weight == 1.0  # the default: the retriever orders, the LLM is not asked

    def no_llm(*args, **kwargs):
        raise AssertionError("request_weight 1 leaves the order to the retriever: no LLM pass")

    session.model.scorer.score = no_llm
    history = list(session.history)
    first = session.ask(REQUEST)
    assert len(first) == 4 and not {session.item_ids[r["item_id"]] for r in first} & set(history)
    liked = session.item_ids[first[0]["item_id"]]
    second = session.feedback("like 1")
    assert session.prompt_history() == [*history, liked]  # the liked item joins the prompt's history
    shown = {r["item_id"] for r in first}
    assert not shown & {r["item_id"] for r in second}  # shown items are not proposed again
    disliked = session.item_ids[second[1]["item_id"]]
    third = session.feedback("dislike 2")
    assert disliked in session.disliked and disliked not in {session.item_ids[r["item_id"]] for r in third}
    steer = session.item_ids[third[0]["item_id"]]
    session.feedback("more like 1")
    assert session.steer == [steer]

    # mistakes: a message, nothing lost
    before = (list(session.last), list(session.liked), set(session.disliked), session.request)
    for line, message in (
        ("like 9", "feedback: like needs a number on the list (1..4), got '9'"),
        ("dislike", "feedback: dislike needs a number on the list (1..4), got 'nothing'"),
        ("frob 2", "unknown command 'frob'; commands: like N"),
        ("   ", "request: empty;"),
    ):
        reply = session.handle(line)
        assert reply.message.startswith(message) and not reply.rows and not reply.done
    assert (list(session.last), list(session.liked), set(session.disliked), session.request) == before

    path = session.save_feedback(str(tmp_path / "feedback" / "session.inter"))
    lines = open(path, encoding="utf-8").read().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\trating:float\ttimestamp:float\tfeedback_session:token"
    assert [line.split("\t")[:3] for line in lines[1:]] == [
        ["u1", first[0]["item_id"], "5"],
        ["u1", second[1]["item_id"], "1"],
    ]
    assert {line.split("\t")[4] for line in lines[1:]} == {session.session_id}
    assert session.save_feedback(path) == path and open(path).read().splitlines() == lines  # each event once


def test_session_errors_are_messages(toy_config_dict):
    session = _session(toy_config_dict, user=None, llm_max_length=160)
    assert session.history == []
    assert session.handle("like 1").message == "feedback: there is no list yet; type a request first"
    assert session.handle("space " * 300).message.startswith("request: too long for the model context")
    assert session.request is None
    assert session.handle("a story").rows  # the session goes on
    with pytest.raises(ValueError, match="user: 'u99' is not a user of 'toy'"):
        _session(toy_config_dict, user="u99")


def test_chat_command_through_stdin(toy_config_dict, monkeypatch, capsys, tmp_path):
    feedback = tmp_path / "chat.inter"
    lines = f"{REQUEST}\ndislike 2\nlike 1\nquit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    args = ["chat", "--dataset", "toy", "--user", "u1", "--topk", "4", "--save-feedback", str(feedback)]
    args += [f"--{k}={v}" for k, v in toy_config_dict.items() if k in ("data_path", "llm_path", "llm_dtype")]
    assert main(args + ["--num_candidates=5", "--state=ERROR"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("\n> ")
    assert blocks[1].startswith(REQUEST) and blocks[2].startswith("dislike 2") and blocks[3].startswith("like 1")

    def listed(block):
        return [line.split(". ", 1)[1].split("  [")[0] for line in block.splitlines() if line[:4].strip().endswith(".")]

    first, second, third = listed(blocks[1]), listed(blocks[2]), listed(blocks[3])
    assert len(first) == len(second) == 4
    disliked = first[1]
    assert f"disliked: {disliked}" in blocks[2] and disliked not in second + third
    assert f"liked: {second[0]} (added to your history)" in blocks[3]
    rows = feedback.read_text(encoding="utf-8").splitlines()[1:]
    assert [r.split("\t")[2] for r in rows] == ["1", "5"]
    assert "feedback: 2 rows added to" in out

    # a second session with the same file: both sessions' rows are kept, each stamped with its session
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{REQUEST}\nlike 3\nquit\n"))
    assert main(args + ["--num_candidates=5", "--state=ERROR"]) == 0
    rows2 = feedback.read_text(encoding="utf-8").splitlines()
    assert rows2[1:3] == rows and len(rows2) == 4 and rows2[0].endswith("\tfeedback_session:token")
    assert len({r.split("\t")[4] for r in rows2[1:]}) == 2
    # a session that says nothing writes nothing
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{REQUEST}\nquit\n"))
    capsys.readouterr()
    assert main(args + ["--num_candidates=5", "--state=ERROR"]) == 0
    assert feedback.read_text(encoding="utf-8").splitlines() == rows2
    assert f"feedback: nothing said, {feedback} untouched" in capsys.readouterr().out


def test_a_file_that_is_not_a_feedback_file_is_refused_before_the_chat(toy_config_dict, monkeypatch, tmp_path):
    real = tmp_path / "toy.inter"
    real.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\ti1\t5\t1\n")
    before = real.read_text()
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{REQUEST}\nlike 1\nquit\n"))
    args = ["chat", "--dataset", "toy", "--user", "u1", "--save-feedback", str(real)]
    args += [f"--{k}={v}" for k, v in toy_config_dict.items() if k in ("data_path", "llm_path", "llm_dtype")]
    with pytest.raises(SystemExit, match=r"is not a feedback file written by recbole-llmgen .* left as it was"):
        main(args + ["--num_candidates=5", "--state=ERROR"])
    assert real.read_text() == before


def test_recommend_with_a_request(toy_config_dict):
    settings = {k: v for k, v in toy_config_dict.items() if k != "show_progress"}
    frame = recommend(None, topk=3, dataset="toy", config_dict=settings, request=REQUEST)
    assert list(frame["user_id"]) == ["new-user"] * 3 and list(frame["rank"]) == [1, 2, 3]
    known = recommend(["u1"], topk=3, dataset="toy", config_dict=settings, request=REQUEST, explain=True)
    assert len(known) == 3 and all(known["explanation"].str.len() > 0)
    with pytest.raises(ValueError, match="users: give at least one user id"):
        recommend(None, dataset="toy", config_dict=settings)
    with pytest.raises(ValueError, match="request: empty"):
        recommend(None, dataset="toy", config_dict=settings, request="")


def test_request_protocol_rows(toy_config_dict, toy_root, tmp_path):
    import math

    from recbole_llmgen import benchmark, per_user, request_bench

    path = toy_root / "toy" / "toy.item"
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    kinds = ("Comedy", "Sci-Fi Drama", "Drama", "unknown")
    path.write_text(
        "\n".join([header + "\tclass:token_seq", *(f"{line}\t{kinds[k % 4]}" for k, line in enumerate(lines))]) + "\n",
        encoding="utf-8",
    )
    # requests: seeded per user, from the target's genres only, never naming it
    assert request_bench.request_for(["Sci-Fi", "Drama"], 3, 2020) == request_bench.request_for(
        ["Sci-Fi", "Drama"], 3, 2020
    )
    text_, genre = request_bench.request_for(["Sci-Fi"], 3, 2020)
    assert genre == "Sci-Fi" and "science fiction" in text_
    assert request_bench.request_for(["unknown"], 3, 2020) == ("I feel like watching a good movie.", None)
    metrics = request_bench.ranking_metrics([5, 7, 9], 7, {7, 9})
    assert metrics == {"ndcg@10": 1 / math.log2(3), "hit@10": 1.0, "match@10": 0.2}

    overrides = bench_overrides(toy_config_dict, llm_dtype="float32")
    out = str(tmp_path / "bench")
    with pytest.raises(ValueError, match="requests: the request protocol needs LLMGen and a classic model"):
        benchmark.run_benchmark("toy", ["Pop"], "full", None, overrides, out, requests=True)
    rows = benchmark.run_benchmark("toy", ["Pop", "LLMGen"], "full", None, overrides, out, log=lambda m: None,
                                   runner=benchmark.run_in_process, requests=True)  # fmt: skip
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]  # Pop, the text retriever, LLMGen
    table = open(f"{out}/requests.md", encoding="utf-8").read()
    names = ["Pop (no request)", "Pop filtered to the requested genre", "LLMGen (no request)",
             "LLMGen with request (weight", "LLMGen with request, LLM order only (weight 0",
             "request-aware retriever alone (weight 1"]  # fmt: skip
    assert all(f"| {name}" in table for name in names)
    import pandas as pd

    frame = pd.read_csv(f"{out}/requests.csv")
    assert list(frame["users"]) == [8] * 6
    users = pd.read_csv(f"{out}/runs/requests.users.csv")
    # the LLMGen row without a request is LLMGen's own benchmark ranking of these users
    own = per_user.read_users(f"{out}/runs/LLMGen")
    assert (
        users.set_index("user_id")["LLMGen (no request) | ndcg@10"].round(6).to_dict()
        == own["ndcg@10"].round(6).to_dict()
    )
    # a genre-filtered list only holds items of the genre
    filtered = users["Pop filtered to the requested genre | match@10"].dropna()
    assert (filtered > 0).all()

    # --eval_users: the protocol evaluates the table's sample, each user exactly as in the whole run;
    # in the same folder, so no row of the whole run may be reused for the sample
    sampled = benchmark.run_benchmark("toy", ["Pop", "LLMGen"], "full", None, {**overrides, "eval_users": 3}, out,
                                      log=lambda m: None, runner=benchmark.run_in_process, requests=True)  # fmt: skip
    assert [r["users"] for r in sampled] == [3, 3, 3]
    assert list(pd.read_csv(f"{out}/requests.csv")["users"]) == [3] * 6
    assert "(test split, full ranking, 3 of 8 users, a seeded sample, seed 2020)" in open(f"{out}/requests.md").read()
    part = pd.read_csv(f"{out}/runs/requests.users.csv").set_index("user_id")
    assert set(part.index) == set(per_user.read_users(f"{out}/runs/Pop").index)
    whole = users.set_index("user_id").loc[part.index]
    for column in ("Pop filtered to the requested genre | ndcg@10", "LLMGen (no request) | ndcg@10"):
        assert part[column].tolist() == pytest.approx(whole[column].tolist()), column


@pytest.mark.parametrize("method", ["verbalizer", "generate"])
def test_every_score_method_takes_a_request(toy_config_dict, method):
    session = _session(toy_config_dict, score_method=method, num_beams=3, request_weight=0.5)
    calls = []
    score = session.model.scorer.score
    session.model.scorer.score = lambda *a, **k: calls.append(a[3]) or score(*a, **k)
    first = session.ask(REQUEST)
    assert calls == [[REQUEST]]  # the LLM scored the list, the request in its prompt
    assert len(first) == 4
    assert session.feedback("dislike 1") and session.item_ids[first[0]["item_id"]] in session.disliked


def test_feedback_whose_next_list_fails_changes_nothing(toy_config_dict, tmp_path, monkeypatch):
    import recbole_llmgen.conversation as conversation

    session = _session(toy_config_dict)
    session.feedback_path = str(tmp_path / "feedback.inter")
    session.ask(REQUEST)
    before = {key: (list(v) if isinstance(v, list) else set(v)) for key, v in session._state().items()}

    def failing(*args, **kwargs):
        raise ValueError("request: too long for the model context")

    monkeypatch.setattr(conversation, "rank_for_request", failing)
    for line in ("like 1", "dislike 2", "more like 3", "not this kind"):
        reply = session.handle(line)
        assert reply.message.startswith("request: too long") and not reply.rows
        assert {key: (list(v) if isinstance(v, list) else set(v)) for key, v in session._state().items()} == before
    assert not os.path.exists(session.feedback_path)  # nothing recorded for feedback that did not take
    monkeypatch.undo()
    assert session.handle("like 1").rows and os.path.exists(session.feedback_path)


def test_why_explains_an_item_of_the_last_list_on_demand(toy_config_dict):
    session = _session(toy_config_dict)
    assert session.handle("why 1").message == "why: there is no list yet; type a request first"
    rows = session.ask(REQUEST)
    reply = session.handle("why 2")
    assert reply.message.startswith(rows[1]["item_text"] + ": ") and len(reply.message) > len(rows[1]["item_text"]) + 2
    assert (
        not reply.rows
        and session.last
        and [r["item_id"] for r in rows] == [str(session.item_tokens[i]) for i, _ in session.last]
    )  # explaining changes no list
    assert session.handle("explain 9").message == "why: needs a number on the list (1..4), got 9"
    assert session.handle("why x").message == "why: needs a number on the list, got 'x'"


def _feedback_file(path, rows):
    """A feedback file as Session.save_feedback writes it: (user, item, rating, time) rows."""
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float\tfeedback_session:token"]
    lines += [f"{u}\t{i}\t{r:g}\t{t}\ts1" for u, i, r, t in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_feedback_of_earlier_sessions_is_used_by_the_next_answer(toy_config_dict, tmp_path):
    """chat and recommend with --feedback: liked items join the history (the prompt shows them),
    disliked items are never proposed; the last verdict on an item counts; a new user's feedback is
    their history."""
    from recbole_llmgen.feedback import read_feedback

    settings = {k: v for k, v in toy_config_dict.items() if k != "show_progress"}
    before = recommend(["u1"], topk=5, dataset="toy", config_dict=settings)
    disliked = list(before["item_id"])[:2]  # what u1 would be offered first
    session = _session(toy_config_dict)
    liked = next(str(session.item_tokens[i]) for i in range(1, len(session.item_tokens))
                 if session.item_ids[str(session.item_tokens[i])] not in session.history
                 and str(session.item_tokens[i]) not in disliked)  # fmt: skip
    path = _feedback_file(tmp_path / "fb.inter", [("u1", disliked[0], 1, 10), ("u1", liked, 1, 11), ("u1", liked, 5, 12),
                                                   ("u1", disliked[1], 1, 13), ("u2", liked, 1, 14)])  # fmt: skip
    ids = session.item_ids
    assert read_feedback([path], "u1", ids) == ([ids[liked]], {ids[disliked[0]], ids[disliked[1]]})
    assert read_feedback([path], "u2", ids) == ([], {ids[liked]})

    after = recommend(["u1"], topk=5, dataset="toy", config_dict=settings, feedback=[path])
    assert not set(after["item_id"]) & set(disliked) and liked not in set(after["item_id"])
    assert len(after) == 5

    opened = Session.open("toy", "u1", config_dict=settings, topk=4, feedback=[path])
    assert opened.prompt_history()[-1] == ids[liked] and opened.history[:-1] == session.history
    assert opened.disliked == {ids[disliked[0]], ids[disliked[1]]}
    rows = opened.ask(REQUEST)
    assert not {r["item_id"] for r in rows} & set(disliked)

    newcomer = _feedback_file(tmp_path / "new.inter", [("new-user", liked, 5, 1)])
    fresh = Session.open("toy", None, config_dict=settings, topk=4, feedback=[newcomer])
    assert fresh.history == [ids[liked]]
    with pytest.raises(ValueError, match=r"feedback: .* line 2: item 'nope' is not an item of this dataset"):
        Session.open(
            "toy", "u1", config_dict=settings, feedback=[_feedback_file(tmp_path / "b.inter", [("u1", "nope", 5, 1)])]
        )
    real = tmp_path / "toy.inter"
    real.write_text("user_id:token\titem_id:token\nu1\ti1\n")
    with pytest.raises(ValueError, match="is not a feedback file written by recbole-llmgen"):
        recommend(["u1"], dataset="toy", config_dict=settings, feedback=[str(real)])

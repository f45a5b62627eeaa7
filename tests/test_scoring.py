import torch

from recbole_llmgen import scoring


def _prompt(tokenizer, text="<|im_start|>user\nI watched Heat (1995)<|im_end|>\n<|im_start|>assistant\n"):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_shared_prefix_equals_naive(tiny_llm):
    model, tokenizer = tiny_llm
    prompt = _prompt(tokenizer)
    texts = ["Toy Story (1995)", "Heat", "A very long title of a movie that goes on (2001)", "X"]
    conts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    naive = scoring.naive_scores(model, prompt, conts)
    for batch_tokens in (1, 20, 2048):  # splitting a user's candidates over rows must not change any score
        shared = scoring.shared_prefix_scores(model, prompt, conts, batch_tokens=batch_tokens)
        assert shared.shape == (4,)
        assert torch.allclose(shared, naive, atol=1e-4), (batch_tokens, shared, naive)
    summed = scoring.shared_prefix_scores(model, prompt, conts, normalization="sum")
    lengths = torch.tensor([len(c) for c in conts], dtype=torch.float)
    assert torch.allclose(summed / lengths, naive, atol=1e-4)
    # scores are real log-probabilities, far enough apart that a wrong position would show
    assert (naive < 0).all()
    assert naive.std() > 0.1
    shifted = scoring.naive_scores(model, [tokenizer.pad_token_id] + prompt, conts)
    assert (shifted - naive).abs().max() > 1e-2


def test_shared_prefix_rejects_empty_continuation(tiny_llm):
    model, tokenizer = tiny_llm
    import pytest

    with pytest.raises(ValueError, match="at least one token"):
        scoring.shared_prefix_scores(model, _prompt(tokenizer), [[1, 2], []])


def test_verbalizer_scores_are_label_logprobs(tiny_llm):
    model, tokenizer = tiny_llm
    prompt = _prompt(tokenizer)
    labels = [tokenizer.encode(c, add_special_tokens=False)[0] for c in "ABCDE"]
    scores = scoring.verbalizer_scores(model, prompt, labels)
    assert scores.shape == (5,)
    assert torch.allclose(scores.exp().sum(), torch.tensor(1.0), atol=1e-5)
    # the same numbers as the full next-token distribution, renormalised over the labels
    logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    expected = torch.log_softmax(logits[labels], dim=-1)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_shared_prefix_across_users_changes_nothing(tiny_llm):
    model, tokenizer = tiny_llm
    head = "<|im_start|>user\nI watched:\n"
    shared = scoring.SharedPrefix(model, tokenizer(head, add_special_tokens=False)["input_ids"])
    conts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["Heat (1995)", "Kolya (1996)"]]
    for history in ["Up (2009)", "Alien (1979)\nAliens (1986)"]:
        prompt = _prompt(tokenizer, head + history + "<|im_end|>\n<|im_start|>assistant\n")
        assert shared.matches(prompt)  # continues from the prefix's cache
        with_shared = scoring.shared_prefix_scores(model, prompt, conts, shared=shared)
        assert torch.allclose(with_shared, scoring.naive_scores(model, prompt, conts), atol=1e-4)
        labels = [tokenizer.encode(c, add_special_tokens=False)[0] for c in "AB"]
        assert torch.allclose(
            scoring.verbalizer_scores(model, prompt, labels, shared=shared),
            scoring.verbalizer_scores(model, prompt, labels),
            atol=1e-4,
        )
    # a prompt that does not start with the prefix is computed in full
    other = _prompt(tokenizer, "<|im_start|>system\nHi<|im_end|>\n")
    assert not shared.matches(other)


def _users(tokenizer):
    head = "<|im_start|>user\nI watched:\n"
    histories = ["Up (2009)", "Alien (1979)\nAliens (1986)\nHeat (1995)", "Z"]
    prompts = [_prompt(tokenizer, head + h + "<|im_end|>\n<|im_start|>assistant\n") for h in histories]
    prompts.append(_prompt(tokenizer, "<|im_start|>system\nHi<|im_end|>\n"))  # does not start with the head
    texts = [
        ["Toy Story (1995)", "Toy Soldiers (1991)", "Toy Story (1995)", "Heat"],  # shared leading tokens, a repeat
        ["A very long title of a movie that goes on (2001)", "X"],
        ["Kolya (1996)"],
        ["Toy Story (1995)", "Twelve Monkeys (1995)", "Babe (1995)"],
    ]
    conts = [[tokenizer(t, add_special_tokens=False)["input_ids"] for t in row] for row in texts]
    return head, prompts, conts


def test_many_users_per_pass_equal_the_naive_reference(tiny_llm):
    model, tokenizer = tiny_llm
    head, prompts, conts = _users(tokenizer)
    naive = [scoring.naive_scores(model, p, c) for p, c in zip(prompts, conts)]
    shared = scoring.SharedPrefix(model, tokenizer(head, add_special_tokens=False)["input_ids"])
    for common in (None, shared):
        for batch_tokens in (1, 40, 100, 4096):  # one row per candidate ... every user in one pass
            got = scoring.score_continuations(model, prompts, conts, shared=common, batch_tokens=batch_tokens)
            assert [len(g) for g in got] == [len(c) for c in conts]
            for g, n in zip(got, naive):
                assert torch.allclose(g, n, atol=1e-4), (common is not None, batch_tokens, g, n)
    summed = scoring.score_continuations(model, prompts, conts, shared=shared, normalization="sum")
    for s, n, c in zip(summed, naive, conts):
        assert torch.allclose(s / torch.tensor([len(x) for x in c], dtype=torch.float), n, atol=1e-4)
    # a repeated candidate gets the same score; different prompts give different scores
    assert got[0][0] == got[0][2]
    assert (naive[0][:1] - naive[3][:1]).abs().item() > 1e-3


def test_prefix_tree_computes_shared_leading_tokens_once(tokenizer):
    texts = ["Toy Story (1995)", "Toy Story 2 (1999)", "Toy Story (1995)"]
    conts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    row = scoring.prefix_tree_row([5, 6, 7], 3, conts)
    common = 0
    while conts[0][common] == conts[1][common]:
        common += 1
    assert common >= 2
    # inputs are every token but the last; the shared head and the repeat are computed once
    assert len(row.nodes) == (len(conts[0]) - 1) + (len(conts[1]) - 1) - common
    for cont, reads in zip(conts, row.reads):
        assert [token for _, token in reads] == cont  # every token is read
        assert reads[0][0] == -1  # the first from the prompt's last position
        for (node, _), j in zip(reads[1:], range(1, len(cont))):
            # the node holds the token before, at depth j - 1, its parent chain spells the prefix
            assert row.nodes[node] == cont[j - 1] and row.depths[node] == j - 1
            chain, k = [], node
            while k >= 0:
                chain.append(row.nodes[k])
                k = row.parents[k]
            assert chain[::-1] == cont[:j]
    assert row.reads[0] == row.reads[2]


def test_verbalizer_batch_equals_one_prompt_at_a_time(tiny_llm):
    model, tokenizer = tiny_llm
    head, prompts, _ = _users(tokenizer)
    shared = scoring.SharedPrefix(model, tokenizer(head, add_special_tokens=False)["input_ids"])
    letters = [tokenizer.encode(c, add_special_tokens=False)[0] for c in "ABCDE"]
    labels = [letters[:5], letters[:2], letters[:3], letters[:4]]
    batched = scoring.verbalizer_scores_batch(model, prompts, labels, shared=shared, batch_tokens=4096)
    for prompt, label, got in zip(prompts, labels, batched):
        assert torch.allclose(got, scoring.verbalizer_scores(model, prompt, label), atol=1e-5)


def test_bad_scoring_arguments_are_named(tiny_llm):
    import pytest

    model, tokenizer = tiny_llm
    with pytest.raises(ValueError, match="normalization: 'max' is not allowed"):
        scoring.score_continuations(model, [_prompt(tokenizer)], [[[1]]], normalization="max")
    with pytest.raises(ValueError, match="batch_tokens: expected an integer >= 1"):
        scoring.score_continuations(model, [_prompt(tokenizer)], [[[1]]], batch_tokens=0)

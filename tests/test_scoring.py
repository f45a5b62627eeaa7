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
    for batch_size in (1, 3, 64):  # chunking must not change any score
        shared = scoring.shared_prefix_scores(model, prompt, conts, batch_size=batch_size)
        assert shared.shape == (4,)
        assert torch.allclose(shared, naive, atol=1e-4), (batch_size, shared, naive)
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
        cache, rest = shared.split(prompt)
        assert cache is not None and len(rest) < len(prompt)
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
    assert shared.split(other)[0] is None

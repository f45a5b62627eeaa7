"""``item_id_format: token``: one new token per item (E4SRec style), the whole catalogue ranked by
one forward pass.

Every item gets an input row (what the LLM reads when the item is in a history) and an output row
(its logit: the last hidden state times the row), both trained with the adapters and saved in the
adapter-only checkpoint. Both start from the item's text: the mean of its title tokens' input
embeddings and of their output rows, so an item never seen in training still has the rows its
text gives it (cold items keep the text's prior; training moves only the rows of items it sees).

A prompt is the list header's text tokens followed by one item token per history item (no line
breaks: one position per item). Scoring reads the hidden state after the last item and takes a
softmax over the catalogue's output rows: every item scored, no candidates, no beams (a full
ranking by construction; seen items masked as every other row's). Training (``sequence``) predicts
every item of a window from the items before it, a cross-entropy over the catalogue at each
position (SASRec's objective with an LLM as the sequence model); ``next_item`` predicts the target
from the history.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

FORMATS = ("title", "token")


class ItemTokens(torch.nn.Module):
    """The catalogue's input and output rows ``[n_items, hidden]`` (row 0: RecBole's padding item)."""

    def __init__(self, llm, item_token_ids: Sequence[Sequence[int]]):
        super().__init__()
        embedding = llm.get_input_embeddings().weight.detach()
        head = llm.get_output_embeddings().weight.detach()
        self.input_rows = torch.nn.Parameter(text_rows(embedding, item_token_ids))
        self.output_rows = torch.nn.Parameter(text_rows(head, item_token_ids))

    def embed(self, llm, head: Sequence[int], histories: Sequence[Sequence[int]]):
        """``(inputs_embeds [B, T, H], attention mask [B, T], last position per row [B])`` of the
        prompts: the header's text tokens, then one item row per history item; right-padded."""
        text = llm.get_input_embeddings()
        device = self.input_rows.device
        head_rows = text(torch.tensor(list(head), device=device))  # [h, H]
        width = len(head) + max(len(h) for h in histories)
        rows = torch.zeros(len(histories), width, head_rows.shape[1], dtype=head_rows.dtype, device=device)
        mask = torch.zeros(len(histories), width, dtype=torch.long, device=device)
        for b, history in enumerate(histories):
            n = len(head) + len(history)
            rows[b, : len(head)] = head_rows
            if history:
                rows[b, len(head) : n] = self.input_rows[torch.tensor(list(history), device=device)].to(rows.dtype)
            mask[b, :n] = 1
        last = mask.sum(1) - 1
        return rows, mask, last

    def hidden(self, llm, head: Sequence[int], histories: Sequence[Sequence[int]]):
        """The LLM's last hidden states of the prompts ``[B, T, H]``, their mask and last positions."""
        rows, mask, last = self.embed(llm, head, histories)
        positions = torch.arange(rows.shape[1], device=rows.device).expand(rows.shape[0], -1)
        out = llm.get_decoder()(inputs_embeds=rows, attention_mask=mask, position_ids=positions)
        return out.last_hidden_state, mask, last

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every item's logit at each hidden state ``[..., n_items]`` (the padding item: -inf)."""
        scores = hidden.float() @ self.output_rows.float().T
        scores[..., 0] = -torch.inf
        return scores

    def scores(self, llm, head: Sequence[int], histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-softmax over the catalogue after each history ``[B, n_items]``: one forward pass."""
        hidden, _, last = self.hidden(llm, head, histories)
        return torch.log_softmax(self.logits(hidden[torch.arange(len(histories)), last]), dim=-1)

    def sequence_loss(self, llm, head: Sequence[int], windows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Cross-entropy over the catalogue of every item of every window after its first, from the
        items before it. [predictions]"""
        hidden, _, _ = self.hidden(llm, head, [w[:-1] for w in windows])
        picks, targets = [], []
        for b, window in enumerate(windows):
            for t in range(1, len(window)):  # the state after item t-1 predicts item t
                picks.append((b, len(head) + t - 1))
                targets.append(window[t])
        rows = torch.tensor(picks, device=hidden.device)
        chosen = hidden[rows[:, 0], rows[:, 1]]  # [N, H]
        return F.cross_entropy(self.logits(chosen), torch.tensor(targets, device=hidden.device), reduction="none")

    def next_item_loss(self, llm, head, histories, targets: Sequence[int]) -> torch.Tensor:
        """Cross-entropy over the catalogue of each target after its history. [B]"""
        hidden, _, last = self.hidden(llm, head, histories)
        logits = self.logits(hidden[torch.arange(len(histories)), last])
        return F.cross_entropy(logits, torch.tensor(list(targets), device=logits.device), reduction="none")


def text_rows(table: torch.Tensor, item_token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per item the mean of ``table``'s rows of its text tokens (fp32); row 0 (padding) zeros."""
    rows = torch.zeros(len(item_token_ids), table.shape[1], dtype=torch.float32)
    for item in range(1, len(item_token_ids)):
        tokens = [t for t in item_token_ids[item] if t < table.shape[0]]
        if tokens:
            rows[item] = table[torch.tensor(tokens, device=table.device)].float().mean(0).cpu()
    return rows

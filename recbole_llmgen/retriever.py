"""Where the LLM's candidates come from, and what each user has already seen.

:class:`Retriever` scores every item for a batch of users with ``candidate_source`` (popularity,
sentence-embedding similarity of the history to item texts, or a classic RecBole model's
``full_sort_predict``) and masks every item the user has already interacted with in training (as
RecBole masks a general model's history: ``item_seq`` alone holds only the last
``MAX_ITEM_LIST_LENGTH`` items). :meth:`Retriever.view` is the one place that reads a batch's users,
histories and seen items; the model, the generator and the conversation all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recbole_llmgen import candidates as cand
from recbole_llmgen import sequence, two_stage
from recbole_llmgen.prompts import field_strings
from recbole_llmgen.settings import LLMGenSettings


@dataclass
class BatchView:
    """One batch of users as LLMGen reads it (all on the CPU)."""

    users: list[int]  # inner user ids (0 where the batch has no user field)
    histories: list[list[int]]  # each user's item_seq (oldest first, never the target)
    seen: list[list[int]]  # items the user may not be recommended: history and training items (seen_items: mask)


class Retriever:
    """Candidate scores for full ranking, and the candidate model's own scores for fusion."""

    def __init__(self, settings: LLMGenSettings, config, dataset, item_texts: list[str], device):
        self.settings, self.item_texts, self.device = settings, item_texts, device
        self.uid_field, self.iid_field = dataset.uid_field, dataset.iid_field
        self.seq_field = self.iid_field + config["LIST_SUFFIX"]
        self.len_field = config["ITEM_LIST_LENGTH_FIELD"]
        self.item_counts = cand.item_counts(dataset.inter_feat[self.iid_field], dataset.item_num)
        # every training item of each user (masked from its candidates, as RecBole masks a general model's history)
        self.training_items = {u: sorted(set(seq)) for u, seq in sequence.training_sequences(dataset).items()}
        self.candidate_model_file = settings.candidate_source if settings.candidate_kind == "file" else None
        self._dataset, self._config = dataset, config
        self._candidate_model = None
        self._item_embeddings: torch.Tensor | None = None
        self._description_embeddings: torch.Tensor | None = None

    # ------------------------------------------------------------------ a batch
    def view(self, interaction) -> BatchView:
        """The batch's users, histories and the items they may not be recommended (none under
        ``seen_items: keep``; a request's own recommendations always leave seen items out)."""
        item_seq = interaction[self.seq_field].cpu()
        lengths = interaction[self.len_field].cpu().tolist()
        histories = [row[:n].tolist() for row, n in zip(item_seq, lengths)]
        if self.uid_field in interaction.interaction:
            users = [int(u) for u in interaction[self.uid_field].cpu().tolist()]
        else:
            users = [0] * len(histories)
        if self.settings.seen_items == "keep":  # the evaluation rule (recbole_llmgen.seen_items): nothing masked
            return BatchView(users, histories, [[] for _ in histories])
        return BatchView(users, histories, [self.seen(u, h) for u, h in zip(users, histories)])

    def seen(self, user: int | None, history: list[int]) -> list[int]:
        """Items ``user`` may not be recommended: ``history`` and every training item of the user."""
        return [*history, *self.training_items.get(int(user), [])] if user is not None else list(history)

    # ------------------------------------------------------------------ scores
    def scores(self, interaction, mask: bool = True, view: BatchView | None = None) -> torch.Tensor:
        """Retriever scores for every item; padding and seen items at -inf unless ``mask`` is off (a
        sampled protocol may list seen items among its negatives). [B, n_items]"""
        view = view or self.view(interaction)
        s = self.settings
        if s.candidate_source in ("pop", "none"):  # none: below the generated items, training popularity
            scores = cand.popularity_scores(self.item_counts, len(view.histories))
        elif s.candidate_kind != "builtin":
            scores = two_stage.candidate_scores(self.candidate_model(), interaction, self.device)
        else:
            windows = [h[-s.max_history_items :] for h in view.histories]
            scores = cand.text_scores(self.item_embeddings(), windows)
        return cand.mask_seen(scores, view.seen) if mask else scores

    def candidate_side(self, retrieval_values: torch.Tensor) -> torch.Tensor:
        """The candidate model's own score of its candidates, as fusion uses it: pop the log of the
        training count, text the similarity, a RecBole model its ``full_sort_predict`` score."""
        return (
            torch.log1p(retrieval_values.clamp(min=0)) if self.settings.candidate_source == "pop" else retrieval_values
        )

    def candidate_model(self):
        """The RecBole model proposing candidates (``candidate_source`` a model file or name)."""
        if self._candidate_model is None:
            if not self.candidate_model_file:
                raise ValueError(
                    f"candidate_source: {self.settings.candidate_source!r} is trained by LLMGenTrainer.fit before "
                    "LLMGen runs; run fit first (RecBole's run_recbole does) or give a saved model file"
                )
            model = two_stage.load_candidate_model(self.candidate_model_file, self._config, self._dataset)
            self._candidate_model = model.to(self.device)  # never trained or saved with LLMGen
        return self._candidate_model

    def set_candidate_model_file(self, path: str | None) -> None:
        """A checkpoint (or a fit that trained the candidate model) names the candidate model's file."""
        self.candidate_model_file = path
        self._candidate_model = None

    # ------------------------------------------------------------------ item texts as vectors
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm sentence embeddings (``text_encoder_path``) on the model's device, returned on
        the CPU; index 0 (padding) a zero vector. [N, d]"""
        return cand.encode_texts(self.settings.text_encoder_path, texts, self.device)

    def item_embeddings(self) -> torch.Tensor:
        """Sentence embeddings of the item texts. [n_items, d]"""
        if self._item_embeddings is None:
            self._item_embeddings = self.encode(self.item_texts)
        return self._item_embeddings

    def item_descriptions(self) -> list[str]:
        """Each item's text plus its other token fields (e.g. ml-100k's genres), for the request retriever."""
        dataset, texts = self._dataset, list(self.item_texts)
        if dataset.item_feat is None:
            return texts
        extra = [
            f
            for f in dataset.item_feat.columns
            if f != self.iid_field and dataset.field2type[f].name in ("TOKEN", "TOKEN_SEQ")
        ]
        columns = [field_strings(dataset, f) for f in extra]
        described = [""]
        for i in range(1, len(texts)):
            parts = [v for v in (column[i] for column in columns) if v and v not in texts[i]]
            described.append(texts[i] + (". " + ", ".join(parts) if parts else ""))
        return described

    def description_embeddings(self) -> torch.Tensor:
        """Sentence embeddings of :meth:`item_descriptions`, computed once. [n_items, d]"""
        if self._description_embeddings is None:
            self._description_embeddings = self.encode(self.item_descriptions())
        return self._description_embeddings

    def item_fields(self) -> list[str]:
        """The loaded item fields besides the item id."""
        feat = self._dataset.item_feat
        return [] if feat is None else [f for f in feat.columns if f != self.iid_field]

    def item_field(self, field: str) -> list[str]:
        """An item field of the dataset as one string per item id (see :func:`prompts.field_strings`)."""
        return field_strings(self._dataset, field)

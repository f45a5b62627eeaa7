"""Two-stage ranking: any RecBole model proposes the candidates that LLMGen reranks.

``candidate_source`` takes ``pop``, ``text``, a saved RecBole checkpoint (``.pth`` of a built-in
such as SASRec, BPR, GRU4Rec) or the name of a RecBole model, which LLMGenTrainer trains first
on the same dataset and split. The candidate model is used through user and item tokens: a
checkpoint of the same dataset with another filtering (or without the item file LLMGen loads)
indexes them differently, and :class:`MappedCandidateModel` translates each batch into its ids and
its scores back. A checkpoint of another dataset is refused with a named error.
"""

from __future__ import annotations

import os
import warnings

import torch
from recbole.utils import ModelType

from recbole_llmgen import integration


def _tokens(dataset, field: str | None) -> list[str]:
    return [str(t) for t in dataset.field2id_token[field]] if field else []


def token_map(ours: list[str], theirs: list[str]) -> torch.Tensor:
    """For each of our ids, the id of the same token in ``theirs`` (0, padding, when it has none). [len(ours)]"""
    index = {token: i for i, token in enumerate(theirs) if i > 0}
    return torch.tensor([0] + [index.get(token, 0) for token in ours[1:]], dtype=torch.long)


class MappedCandidateModel:
    """A candidate model whose dataset maps users and items to other inner ids than LLMGen's (another
    filtering, or LLMGen's item file adding items): each batch goes to it in its own id space, by
    token, and its scores come back in LLMGen's. Items it does not know score below every item it
    knows (in item-id order); a user it does not know is its padding user."""

    def __init__(self, model, user_map: torch.Tensor, item_map: torch.Tensor):
        self.model, self.user_map, self.item_map = model, user_map, item_map

    def to(self, device):
        self.model = self.model.to(device)
        return self

    def eval(self):
        self.model.eval()
        return self

    def translate(self, interaction):
        """The batch in the candidate model's ids: user, and the history with unknown items left out."""
        from recbole.data.interaction import Interaction

        model = self.model
        fields = {}
        uid = getattr(model, "USER_ID", None)
        if uid and uid in interaction.interaction:
            fields[uid] = self.user_map[interaction[uid].cpu()]
        seq_field, len_field = getattr(model, "ITEM_SEQ", None), getattr(model, "ITEM_SEQ_LEN", None)
        if seq_field and seq_field in interaction.interaction:
            mapped = self.item_map[interaction[seq_field].cpu()]  # [B, L], 0 = padding or unknown
            lengths = (mapped > 0).sum(dim=1)
            order = torch.sort((mapped == 0).int(), dim=1, stable=True).indices  # known items first, in order
            fields[seq_field] = mapped.gather(1, order)
            fields[len_field] = lengths.clamp(min=1)  # RecBole's models read position len - 1
        return Interaction(fields)

    @torch.no_grad()
    def scores(self, interaction, device) -> torch.Tensor:
        theirs = self.model.full_sort_predict(self.translate(interaction).to(device))
        theirs = theirs.view(len(interaction), -1).float().cpu()  # [B, its items]
        known = self.item_map > 0
        floor = theirs.min(dim=1, keepdim=True).values - 1.0
        ranks = torch.arange(len(self.item_map), dtype=torch.float) / len(self.item_map)
        ours = floor - ranks  # unknown items: below every known one, in item-id order
        ours[:, known] = theirs[:, self.item_map[known]]
        return ours


MIN_SHARED = 0.5  # a candidate model must know at least this share of the run's items (and users, if general)


def check_coverage(path: str, name: str, kind: str, tokens: tuple, dataset: str) -> int:
    """How many of the run's ``kind`` tokens (``tokens[0]``, padding first) the candidate model's
    dataset (``tokens[1]``) holds; a named error with the counts below :data:`MIN_SHARED`."""
    ours = set(tokens[0][1:])
    known = len(ours & set(tokens[1][1:]))
    if known < MIN_SHARED * len(ours):
        raise ValueError(
            f"candidate_source: {path} ({name}) knows {known} of this run's {len(ours)} {kind} tokens of "
            f"{dataset!r} ({known / max(len(ours), 1):.0%}; at least {MIN_SHARED:.0%} needed): not a model of "
            "this data; train it on this dataset or name the model instead"
        )
    return known


def load_candidate_model(path: str, config, dataset):
    """The RecBole model saved at ``path`` (frozen, eval mode): rebuilt on ``dataset`` when both map
    users and items alike, else on its own dataset behind a :class:`MappedCandidateModel`."""
    from recbole.utils import get_model

    checkpoint = integration.load_checkpoint(path)  # a file the user named (a pickle, as every RecBole checkpoint)
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"candidate_source: {path} is not a RecBole checkpoint (no config / state_dict in it)")
    saved = checkpoint["config"]
    name = saved["model"]
    if name == "LLMGen":
        raise ValueError(f"candidate_source: {path} is an LLMGen checkpoint; choose a classic model's checkpoint")
    if saved["dataset"] != config["dataset"]:
        raise ValueError(
            f"candidate_source: {path} ({name}) was trained on dataset {saved['dataset']!r}, "
            f"not {config['dataset']!r}; train it on {config['dataset']!r} or name the model instead"
        )
    from recbole.data import create_dataset

    own = create_dataset(saved)
    items = (_tokens(dataset, dataset.iid_field), _tokens(own, own.iid_field))
    users = (_tokens(dataset, dataset.uid_field), _tokens(own, own.uid_field))
    check_coverage(path, name, "item", items, config["dataset"])
    if saved["MODEL_TYPE"] != ModelType.SEQUENTIAL:  # a general model scores users by their own embedding
        known = check_coverage(path, name, "user", users, config["dataset"])
        if known < len(users[0]) - 1:
            warnings.warn(
                f"candidate_source: {path} ({name}) knows {known} of this run's {len(users[0]) - 1} users; "
                "the others get its padding user's scores (their candidates are its item order, not theirs)",
                stacklevel=2,
            )
    same = items[0] == items[1] and users[0] == users[1]
    model = get_model(name)(saved, dataset if same else own)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    model.requires_grad_(False)
    model.eval()
    if same:
        return model
    return MappedCandidateModel(model, token_map(*users), token_map(*items))


@torch.no_grad()
def candidate_scores(model, interaction, device) -> torch.Tensor:
    """The candidate model's full-ranking scores for the batch's users. [B, n_items]"""
    model.eval()
    if isinstance(model, MappedCandidateModel):
        return model.scores(interaction, device)
    scores = model.full_sort_predict(interaction.to(device))
    return scores.view(len(interaction), -1).float().cpu()


def candidate_model_config(name: str, config) -> dict:
    """Config dict for the model named in ``candidate_source``: the run's own settings (minus
    LLMGen's keys), the same split (``eval_args``), columns and seed, then ``candidate_model_config``."""
    llmgen_keys = integration.llmgen_keys()
    shared = {k: v for k, v in config.external_config_dict.items() if k not in llmgen_keys and k != "model"}
    for key in ("eval_args", "load_col", "seed", "checkpoint_dir", "alias_of_item_id"):
        shared[key] = config[key]
    # RecBole's final data_path is <data_path>/<dataset>: hand the folder above it on
    shared["data_path"] = os.path.dirname(os.path.normpath(config["data_path"]))
    own = config["candidate_model_config"] or {}
    if not isinstance(own, dict):
        raise ValueError(f"candidate_model_config: expected a dict of RecBole settings for {name}, got {own!r}")
    return {**shared, **own}


def train_candidate_model(name: str, config, show_progress: bool = False) -> str:
    """Train RecBole's ``name`` on the run's dataset and split; returns its best checkpoint."""
    from recbole.utils import get_trainer

    own = integration.build_config(name, config["dataset"], candidate_model_config(name, config))
    train_data, valid_data, _ = integration.load_data(own)
    trainer = get_trainer(own["MODEL_TYPE"], name)(own, integration.build_model(own, train_data))
    trainer.fit(train_data, valid_data, saved=True, show_progress=show_progress)
    return trainer.saved_model_file

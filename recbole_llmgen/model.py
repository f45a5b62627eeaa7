"""LLMGen: a Hugging Face causal LM as a RecBole sequential recommender.

Like RecBole's own model files: ``__init__`` reads the config once (:class:`LLMGenSettings`) and
builds the parts, then the contract: ``calculate_loss``, ``predict``, ``full_sort_predict``. The
parts are plain objects, so the frozen LLM stays out of the module tree (RecBole's optimizer and
``state_dict()`` see only the trainable tensors):

* ``prompts`` (:class:`Prompter`): item texts, their tokens, prompts and training rows;
* ``retriever`` (:class:`Retriever`): a batch's histories and seen items, candidate scores;
* ``scorer`` (:class:`Scorer`): the LLM's scores of candidate lists (cached only inside ``scorer.cached()``);
* ``generator`` (:class:`Generator`): the items the LLM writes itself (``score_method: generate``).
"""

from __future__ import annotations

import contextlib
import math

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_llmgen import candidates as cand
from recbole_llmgen import finetune, prompts, sequence
from recbole_llmgen.generation import Generator
from recbole_llmgen.item_tokens import ItemTokens
from recbole_llmgen.llm import autocast_dtype, load_llm
from recbole_llmgen.prompts import Prompter
from recbole_llmgen.retriever import Retriever
from recbole_llmgen.scorer import Scorer
from recbole_llmgen.settings import LLMGenSettings


class LLMGen(SequentialRecommender):
    r"""An LLM scores, reranks or writes the next items from the text of the user's history.

    Zero-shot: ``train_mode: none`` trains nothing; see ``properties/LLMGen.yaml`` for every key.
    """

    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.settings = s = LLMGenSettings.from_config(config, self.n_items)

        # the LLM, frozen and outside the module tree; only its trainable tensors are registered
        llm, self.tokenizer = load_llm(
            s.llm_path, self.device, s.llm_dtype, s.llm_cache_dir, s.trust_remote_code, s.train_mode
        )
        object.__setattr__(self, "llm", llm)
        # training computes in bf16 where the hardware does (CUDA, CPUs with native bf16) unless the user
        # asked for fp32; trainable weights stay fp32 (peft upcasts adapters, full loads fp32 weights)
        self.autocast_dtype = None if s.llm_dtype == "float32" else autocast_dtype(self.device)
        self.base_fingerprint = finetune.fingerprint(llm, s.llm_path)
        peft_model = finetune.make_trainable(llm, s.train_mode, s.lora, s.gradient_checkpointing)
        object.__setattr__(self, "peft_model", peft_model)  # for save_pretrained exports; not a submodule
        # evaluation mode merges LoRA into the weights (base-model speed), training mode restores them exactly
        self.adapters = finetune.MergedAdapters(llm) if peft_model is not None else None
        self.llm_trainable = torch.nn.ParameterDict(finetune.trainable_parameters(llm))
        self.items_fingerprint = finetune.items_fingerprint(config["dataset"], dataset.field2id_token[self.ITEM_ID])

        # the parts
        self.item_texts = prompts.item_texts(config, dataset, s.item_text_fields, s.item_text_template)
        context = getattr(llm.config, "max_position_embeddings", None) or 2048
        self.prompts = Prompter(s, self.tokenizer, self.item_texts, context)
        self.retriever = Retriever(s, config, dataset, self.item_texts, self.device)
        self.scorer = Scorer(llm, self.prompts, s, self.retriever.item_counts)
        self.generator = Generator(
            llm, self.prompts, s, self.retriever, self.scorer.shared_prefix, self.scorer.active_length_penalty
        )

        # item_id_format: token: the catalogue's own input and output rows (trained and saved with the adapters)
        self.item_tokens = ItemTokens(llm, self.prompts.item_token_ids).to(self.device) if self.tokens else None
        if self.item_tokens is not None and s.train_mode == "none":
            self.item_tokens.requires_grad_(False)  # zero-shot: the rows its titles give, nothing trains them

        # saved with the checkpoint besides the trainable weights (RecBole's other_parameter)
        self.other_parameter_name = ["candidate_model_file", "fusion_weight"]
        if s.length_penalty == "auto":  # the value chosen on the valid split
            self.other_parameter_name.append("length_penalty")
        self.fusion_weight = s.fusion_weight  # score_fusion: auto sets it on the valid split
        if self.candidate_model_file:
            self.retriever.candidate_model()  # a mismatched file fails now, before any evaluation

    @property
    def tokens(self) -> bool:
        """``item_id_format: token``: items are tokens of their own (:mod:`recbole_llmgen.item_tokens`)."""
        return self.settings.item_id_format == "token"

    @property
    def candidate_model_file(self) -> str | None:
        return self.retriever.candidate_model_file

    @candidate_model_file.setter
    def candidate_model_file(self, path: str | None) -> None:
        self.retriever.set_candidate_model_file(path)

    @property
    def length_penalty(self) -> float | None:
        """The length penalty in use by scoring and generation (``length_penalty: auto``: None until
        the valid split chooses it; saved with the checkpoint)."""
        return self.scorer.length_penalty

    @length_penalty.setter
    def length_penalty(self, value: float | None) -> None:
        self.scorer.set_length_penalty(value)

    # ------------------------------------------------------------------ training state
    def identity(self) -> dict:
        """What a checkpoint must match to be loaded into this model."""
        s = self.settings
        return {
            "format": finetune.CHECKPOINT_FORMAT,
            "base_model": self.base_fingerprint,
            "items": self.items_fingerprint,
            "train_mode": s.train_mode,
            "lora": s.lora,
            "objective": s.train_objective if s.train_mode != "none" else None,
            "item_id_format": s.item_id_format,
        }

    def get_extra_state(self) -> dict:
        return self.identity()

    def set_extra_state(self, state) -> None:
        finetune.check_checkpoint(state, self.identity())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Check the identity card first (a named error, before any weight is touched), then load."""
        finetune.check_checkpoint(state_dict.get("_extra_state"), self.identity())
        merged = self.adapters is not None and self.adapters.merged
        if merged:  # the merged weights hold the old adapters
            self.adapters.unmerge()
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if merged:
            self.adapters.merge()
        self.scorer.weights_changed()
        self.generator.weights_changed()
        return result

    def train(self, mode: bool = True):
        """Also switches the LLM (outside the module tree) between train and eval mode; LoRA
        adapters are merged into the weights in eval mode and taken out again for training."""
        super().train(mode)
        self.llm.train(mode and self.settings.train_mode != "none")
        if self.adapters is not None and mode:
            self.adapters.unmerge()
        elif self.adapters is not None:
            self.adapters.merge()
        if mode:  # the weights will change
            self.scorer.weights_changed()
            self.generator.weights_changed()
        return self

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()``... would move only the trainable tensors (the LLM is
        outside the module tree): a move to another device or dtype is refused by name."""
        probe = torch.zeros((), device=self.device)
        moved = fn(probe)
        if moved.device != probe.device or moved.dtype != probe.dtype:
            raise ValueError(
                f"LLMGen: moving the model to {moved.device} / {moved.dtype} is not supported (the LLM lives outside "
                f"the module tree and stays on {self.device}); set the device with RecBole's use_gpu / gpu_id and "
                "the LLM's dtype with llm_dtype"
            )
        return super()._apply(fn, recurse)

    @contextlib.contextmanager
    def cached(self):
        """Within this block the LLM scores (and generates for) each user once: the fusion grid and
        a fused row's LLM-only twin evaluate the same users again. Nothing is kept after it."""
        with self.scorer.cached(), self.generator.cached(), self.generator.session():
            yield

    @contextlib.contextmanager
    def training_precision(self):
        """Where training's forward and loss run: under autocast when ``autocast_dtype`` is set
        (trainable weights stay fp32); peft's cast of each LoRA input to the adapter's fp32 is then
        skipped, since autocast casts it back anyway (two copies of every activation saved)."""
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            if self.peft_model is None:
                yield
                return
            from peft.helpers import disable_input_dtype_casting

            with disable_input_dtype_casting(self.llm):
                yield

    # ------------------------------------------------------------------ RecBole contract
    def forward(self, item_seq, item_seq_len):
        raise NotImplementedError("LLMGen scores through predict/full_sort_predict")

    def calculate_loss(self, interaction) -> torch.Tensor:
        """Mean training loss of the batch: list windows (``sequence``) or (history, target) rows."""
        if self.settings.train_mode == "none":
            raise RuntimeError(
                "train_mode: none is zero-shot: LLMGen has nothing to train. LLMGenTrainer skips "
                "training; use it (RecBole picks it by name) instead of a plain Trainer, or set "
                "train_mode: lora | full."
            )
        if self.adapters is not None:  # gradients reach adapters only outside the merged weights
            self.adapters.unmerge()
        pad = self.tokenizer.pad_token_id
        if sequence.WINDOW_FIELD in interaction.interaction:
            window, lengths = interaction[sequence.WINDOW_FIELD].cpu(), interaction[sequence.WINDOW_LEN_FIELD].cpu()
            windows = [row[:n].tolist() for row, n in zip(window, lengths.tolist())]
            if self.tokens:
                return self.item_tokens.sequence_loss(self.llm, self.prompts.list_head, windows).mean()
            rows, spans = self.prompts.window_rows(windows)
            return finetune.sequence_item_nll(self.llm, rows, spans, pad).mean()
        view = self.retriever.view(interaction)
        targets = interaction[self.ITEM_ID].cpu().tolist()
        if self.tokens:
            histories = [h[-self.settings.max_history_items :] for h in view.histories]
            return self.item_tokens.next_item_loss(self.llm, self.prompts.list_head, histories, targets).mean()
        if self.settings.score_method == "verbalizer":
            shown, positions = self.training_lists(interaction, targets)
            rows = [self.prompts.build(h, s) for h, s in zip(view.histories, shown)]
            losses = finetune.label_cross_entropy(self.llm, rows, self.prompts.label_token_ids, positions, pad)
        else:
            target_tokens = [self.prompts.item_token_ids[t] for t in targets]
            rows = [self.prompts.build(h, reserve_tokens=len(t)) for h, t in zip(view.histories, target_tokens)]
            losses = finetune.target_token_nll(self.llm, rows, target_tokens, pad)
        return losses.mean()

    def training_lists(self, interaction, targets: list[int]) -> tuple[list[list[int]], list[int]]:
        """Verbalizer training lists: ``num_candidates - 1`` retrieved items (never the target or a
        seen item) with the target at a random position. Returns (lists, target positions)."""
        retrieval = self.retriever.scores(interaction)
        retrieval[torch.arange(len(targets)), torch.tensor(targets)] = -math.inf
        others = cand.top_candidates(retrieval, self.settings.num_candidates - 1)
        shown, positions = [], []
        for b, target in enumerate(targets):
            items = [i for i in others[b].tolist() if retrieval[b, i] > -math.inf]
            position = int(torch.randint(len(items) + 1, (1,)))
            shown.append(items[:position] + [target] + items[position:])
            positions.append(position)
        return shown, positions

    def predict(self, interaction) -> torch.Tensor:
        """Scores of (user, item) rows (sampled protocols); a user's rows share one prompt. [N]"""
        view = self.retriever.view(interaction)
        items = interaction[self.ITEM_ID].cpu()
        if self.tokens:  # each row's item in the catalogue's log-softmax after its history
            scores = self._token_scores(view)
            return scores[torch.arange(len(items)), items].to(self.device)
        groups: dict[tuple, list[int]] = {}
        for row, (user, history) in enumerate(zip(view.users, view.histories)):
            groups.setdefault((user, tuple(history)), []).append(row)
        rows = [sorted(group, key=lambda r: int(items[r])) for group in groups.values()]  # canonical order
        lists = [[int(items[r]) for r in group] for group in rows]
        weight = self.active_fusion_weight()
        if weight == 0.0:  # the candidate model's order: nothing for the LLM to add
            results = [torch.zeros(len(ids)) for ids in lists]
        else:
            results = self.scorer.score([list(h) for _, h in groups], lists, [u for u, _ in groups])
        if weight is not None:  # each user's sampled items are its candidate list
            retrieval = self.retriever.scores(interaction, mask=False, view=view)
            side = self.retriever.candidate_side(retrieval[torch.arange(len(items)), items])
            results = [cand.fuse(r[None], side[group][None], weight)[0] for r, group in zip(results, rows)]
        scores = torch.empty(len(items))
        for result, group in zip(results, rows):
            scores[group] = result
        return scores.to(self.device)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        """LLM-scored (or generated) items above every other item, the rest in retriever order. [B, n_items]"""
        view = self.retriever.view(interaction)
        if self.tokens:  # one forward pass ranks the whole catalogue; seen items never ranked
            return cand.mask_seen(self._token_scores(view), view.seen).to(self.device)
        retrieval = self.retriever.scores(interaction, view=view)  # [B, n_items]
        if self.settings.score_method == "generate":
            return self._generated_full_sort(view, retrieval)
        candidate_ids = cand.top_candidates(retrieval, self.settings.num_candidates)  # [B, K]
        weight = self.active_fusion_weight()
        llm_scores = torch.full(candidate_ids.shape, -math.inf)  # [B, K]
        batch, lists = [], []
        for b in range(len(candidate_ids)):
            valid = candidate_ids[b][retrieval[b, candidate_ids[b]] > -math.inf].tolist()
            if valid and weight == 0.0:  # the candidate model's ranking: nothing for the LLM to add
                llm_scores[b, : len(valid)] = 0.0
            elif valid:
                batch.append(b)
                lists.append(sorted(valid))  # canonical order, the same as predict's
        histories, users = [view.histories[b] for b in batch], [view.users[b] for b in batch]
        results = self.scorer.score(histories, lists, users) if batch else []
        for b, ordered, result in zip(batch, lists, results):
            lookup = dict(zip(ordered, result.tolist()))
            llm_scores[b, : len(ordered)] = torch.tensor([lookup[i] for i in candidate_ids[b][: len(ordered)].tolist()])
        if weight is not None:
            side = self.retriever.candidate_side(retrieval.gather(1, candidate_ids))
            llm_scores = cand.fuse(llm_scores, side, weight)
        return cand.merge_scores(retrieval, candidate_ids, llm_scores).to(self.device)

    def _token_scores(self, view) -> torch.Tensor:
        """item_id_format: token: the catalogue's log-softmax after each history (its last
        ``max_history_items``). [B, n_items], on the CPU"""
        histories = [[i for i in h if i][-self.settings.max_history_items :] for h in view.histories]
        return self.item_tokens.scores(self.llm, self.prompts.list_head, histories).cpu()

    def _generated_full_sort(self, view, retrieval: torch.Tensor) -> torch.Tensor:
        """Items the beams reached, by score (fused with the candidate model's score of each when
        ``score_fusion`` is on), above all others, kept in retriever order (``candidate_source:
        none``: training popularity). [B, n_items]"""
        if self.settings.generation_constraint == "none":
            return cand.mask_seen(self.generator.grounded(view.histories), view.seen).to(self.device)
        found = self.generator.items(view.histories, seen=view.seen)
        width = max(1, max(len(f) for f in found))
        candidate_ids = torch.zeros(len(found), width, dtype=torch.long)  # [B, W]
        llm_scores = torch.full((len(found), width), -math.inf)  # [B, W]
        for b, pairs in enumerate(found):
            if pairs:
                candidate_ids[b, : len(pairs)] = torch.tensor([i for i, _ in pairs])
                llm_scores[b, : len(pairs)] = torch.tensor([v for _, v in pairs])
        weight = self.active_fusion_weight()
        if weight is not None:  # BIGRec / D3 style: the candidate model's score of each generated item
            side = self.retriever.candidate_side(retrieval.gather(1, candidate_ids))
            llm_scores = cand.fuse(llm_scores, side, weight)
        return cand.merge_scores(retrieval, candidate_ids, llm_scores).to(self.device)

    def active_fusion_weight(self) -> float | None:
        """The LLM's weight in the fused score (None: no fusion, the LLM ranks the candidates)."""
        if self.settings.score_fusion == "none":
            return None
        if self.fusion_weight is None:
            raise ValueError(
                "score_fusion: auto chooses its weight on the valid split, and no validation has run; train or "
                "fit with valid data (LLMGenTrainer.fit does), load a checkpoint that has it, or set a weight in [0, 1]"
            )
        return float(self.fusion_weight)

    # ------------------------------------------------------------------ reporting
    def flops_estimate(self) -> int:
        """Rough FLOPs to score one user (2 x parameters x tokens processed)."""
        s = self.settings
        n_params = sum(p.numel() for p in self.llm.parameters())
        item_tokens = sum(len(t) for t in self.prompts.item_token_ids[1:]) / max(1, self.n_items - 1)
        prompt_tokens = 60 + s.max_history_items * (item_tokens + 3)
        scored = s.num_candidates * item_tokens if s.score_method == "likelihood" else 0
        return int(2 * n_params * (prompt_tokens + scored))

    def __str__(self) -> str:
        s = self.settings
        n_frozen = sum(p.numel() for p in self.llm.parameters() if not p.requires_grad)
        return (
            f"LLMGen(llm={type(self.llm).__name__} with {n_frozen / 1e6:.1f}M frozen parameters, "
            f"score_method={s.score_method}, candidate_source={s.candidate_source}, "
            f"num_candidates={s.num_candidates}, max_history_items={s.max_history_items}, "
            f"chat_template={self.prompts.use_chat}, train_mode={s.train_mode})\nTrainable parameters: "
            f"{sum(p.numel() for p in self.parameters() if p.requires_grad)}"
        )

"""LLMGenTrainer: RecBole's Trainer, aware that a zero-shot LLM has nothing to train and that a
fine-tuned one trains in small micro-batches."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch.nn.utils.clip_grad import clip_grad_norm_
from tqdm import tqdm

from recbole_llmgen import distributed, finetune, progress, sequence, two_stage
from recbole_llmgen.llm import training_attention
from recbole_llmgen.settings import FUSION_GRID, LENGTH_PENALTY_GRID

LOG_EVERY = 50  # optimizer steps between loss lines in the log


class LLMGenTrainer(Trainer):
    """RecBole's Trainer for LLMGen.

    * ``train_mode: none``: ``fit`` runs one validation pass and no training; the checkpoint holds
      the config and the (empty) trainable state only, never the frozen LLM; ``evaluate`` has no
      best model to reload.
    * The optimizer is built only from parameters that require grad (none when zero-shot).
    * ``predict`` receives whole users: LLMGen groups rows by user and batches internally, and a
      listwise scorer (verbalizer) needs all of a user's candidates in one call.
    * ``train_mode: lora | full``: RecBole's ``fit`` (validation every ``eval_step`` epochs,
      early stopping on ``valid_metric``, best checkpoint) over each user's most recent
      ``llm_train_examples_per_user`` examples. Each RecBole batch (``train_batch_size`` rows) is
      one optimizer step, accumulated over micro-batches of ``llm_train_batch_size`` rows; bf16
      autocast on CUDA and on CPUs with native bf16 (``LLMGen.training_precision``). ``checkpoint: PATH``
      resumes training from a saved checkpoint. ``llm_train_objective: sequence`` trains on
      :class:`~recbole_llmgen.sequence.WindowLoader` batches (every training interaction each epoch)
      instead; a loss line every ``LOG_EVERY`` optimizer steps gives the curve within an epoch.
    * ``score_fusion: auto`` / ``length_penalty: auto``: every validation first chooses the LLM's
      fusion weight / the length penalty on the valid split.
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self.test_batch_size = float("inf")  # never split a user's rows in _spilt_predict
        self.fusion_history: list[dict] = []  # score_fusion: auto: {weight: valid result} per validation
        self.fusion_weights: list[float] = []  # score_fusion: auto: the weight chosen at each validation
        self.length_penalty_history: list[dict] = []  # length_penalty: auto: {value: valid result} per validation
        self.length_penalties: list[float] = []  # length_penalty: auto: the value chosen at each validation

    def _trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def _build_optimizer(self, **kwargs):
        if not self._trainable_parameters():
            return None
        kwargs.setdefault("params", self._trainable_parameters())
        return super()._build_optimizer(**kwargs)

    @property
    def zero_shot(self) -> bool:
        return self.model.settings.train_mode == "none"

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        settings = self.model.settings
        if settings.candidate_kind == "model" and not self.model.candidate_model_file:
            name = settings.candidate_source
            if verbose:
                self.logger.info(set_color(f"candidate_source: {name}", "green") + ": training it first")
            self.model.candidate_model_file = two_stage.train_candidate_model(name, self.config, show_progress)
        if not self.zero_shot:
            if settings.train_objective == "sequence":
                train_data = sequence.window_loader(
                    train_data, self.model, self.config["train_batch_size"], int(self.config["seed"] or 0)
                )
                what = (
                    f"{len(train_data.items)} windows of up to {settings.max_history_items + 1} items "
                    f"({train_data.predictions} next-item predictions)"
                )
            else:
                train_data = finetune.bounded_train_loader(train_data, settings.llm_train_examples_per_user)
                what = f"{len(train_data._dataset)} training examples"
            if verbose:
                self.logger.info(
                    set_color(f"train_mode: {settings.train_mode}", "green")
                    + f", llm_train_objective: {settings.train_objective}: {what} per epoch, "
                    + f"{sum(p.numel() for p in self._trainable_parameters())} trainable parameters"
                )
            resume = self.config["checkpoint"]
            if resume:
                if not os.path.isfile(resume):
                    raise FileNotFoundError(f"checkpoint: {resume!r} does not exist (a checkpoint to resume from)")
                self.resume_checkpoint(resume)
            return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        self.eval_collector.data_collect(train_data)
        if verbose:
            self.logger.info(set_color("train_mode: none", "green") + ": zero-shot, no training")
        if valid_data:
            self.best_valid_score, self.best_valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
            if verbose:
                self.logger.info(set_color("valid result", "blue") + f": {self.best_valid_result}")
        if saved:
            self._save_checkpoint(-1, verbose=verbose)
        return self.best_valid_score, self.best_valid_result

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        """One optimizer step per RecBole batch, gradients accumulated over micro-batches (on a CPU
        with the model's eager attention: :func:`~recbole_llmgen.llm.training_attention`)."""
        with training_attention(self.model.llm):
            return self._train_steps(train_data, epoch_idx, loss_func, show_progress)

    def _train_steps(self, train_data, epoch_idx, loss_func, show_progress):
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        micro = self.model.settings.llm_train_batch_size
        total = 0.0
        if isinstance(train_data, sequence.WindowLoader):
            train_data.set_epoch(epoch_idx)  # reshuffled every epoch (each rank its own batches)
        elif distributed.active(self.config) and train_data.shuffle:
            train_data.sampler.set_epoch(epoch_idx)  # each rank its own shard, reshuffled every epoch
        iter_data = train_data
        if show_progress:
            iter_data = tqdm(
                train_data, total=len(train_data), ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink")
            )
        start_time, recent = time.perf_counter(), []
        steps = progress.tracker(f"LLMGen: epoch {epoch_idx + 1}: training", len(train_data), "optimizer steps")
        for step, interaction in enumerate(iter_data, 1):
            interaction = interaction.to(self.device)
            self.optimizer.zero_grad()
            rows = len(interaction)
            batch_loss = 0.0
            starts = range(0, rows, micro)
            for start in starts:
                part = interaction[torch.arange(start, min(start + micro, rows))]
                with self.model.training_precision():  # bf16 autocast on CUDA / native-bf16 CPUs
                    loss = loss_func(part) * (len(part) / rows)
                self._check_nan(loss)
                batch_loss += loss.item()
                if start == starts[-1]:  # multi-process: all-reduce the accumulated gradients once
                    loss = loss + distributed.sync_gradients_next_backward(self)
                loss.backward()
            if self.clip_grad_norm:
                clip_grad_norm_(self._trainable_parameters(), **self.clip_grad_norm)
            self.optimizer.step()
            total += batch_loss
            recent.append(batch_loss)
            if steps is not None:
                steps.advance(note=f"loss {batch_loss:.3f}")
            if step % LOG_EVERY == 0:  # a learning curve within the epoch (an LLM epoch is long on a CPU)
                self.logger.info(
                    f"epoch {epoch_idx} step {step}/{len(train_data)}: mean loss of the last {len(recent)} "
                    f"steps {sum(recent) / len(recent):.4f}, {time.perf_counter() - start_time:.0f} s"
                )
                recent = []
        return total

    def _valid_epoch(self, valid_data, show_progress=False):
        """``score_fusion: auto`` and / or ``length_penalty: auto``: first choose the LLM's fusion
        weight (``FUSION_GRID``) and the length penalty (``LENGTH_PENALTY_GRID``) on this (valid) split
        by ``valid_metric``, every pair when both are auto (the LLM scores each user once; every value
        reuses it), then validate with them. Both are saved with the checkpoint; the test split never
        sees the grid."""
        settings = self.model.settings
        if settings.score_fusion != "auto" and settings.length_penalty != "auto":
            return super()._valid_epoch(valid_data, show_progress=show_progress)
        with self.model.cached():  # the grid and the validation score each user once
            self.choose_on_valid(valid_data)
            return super()._valid_epoch(valid_data, show_progress=show_progress)

    def choose_on_valid(self, valid_data) -> tuple[float | None, float | None]:
        """The (length penalty, fusion weight) with the best ``valid_metric`` on ``valid_data``, each
        from its grid where it is ``auto`` (else the model's value, None when off); set on the model."""
        settings, model = self.model.settings, self.model
        penalties = LENGTH_PENALTY_GRID if settings.length_penalty == "auto" else (model.length_penalty,)
        weights = FUSION_GRID if settings.score_fusion == "auto" else (model.fusion_weight,)
        results = {}
        for penalty in penalties:
            model.length_penalty = penalty
            for weight in weights:
                model.fusion_weight = weight
                results[penalty, weight] = self.evaluate(valid_data, load_best_model=False, show_progress=False)
        scores = {pair: float(r[self.valid_metric]) for pair, r in results.items()}
        sign = 1 if self.valid_metric_bigger else -1
        # a tie goes to the mean (the larger penalty) and to the candidate model's side (the smaller weight)
        penalty, weight = max(scores, key=lambda pw: (sign * scores[pw], pw[0] or 0.0, -(pw[1] or 0.0)))
        model.length_penalty, model.fusion_weight = penalty, weight
        chosen = (penalty, weight)
        axes = [("length_penalty", 0, self.length_penalty_history, self.length_penalties, "length penalty"),
                ("score_fusion", 1, self.fusion_history, self.fusion_weights, "LLM weight")]  # fmt: skip
        for key, axis, history, values, what in axes:
            if getattr(settings, key) != "auto":
                continue
            other = 1 - axis  # this axis's results at the other's chosen value
            history.append({pair[axis]: r for pair, r in results.items() if pair[other] == chosen[other]})
            values.append(chosen[axis])
            self.logger.info(
                set_color(f"{key}: auto", "green")
                + f": {what} {chosen[axis]:g} chosen on the valid split ({self.valid_metric}: "
                + ", ".join(f"{pair[axis]:g}: {v:.4f}" for pair, v in scores.items() if pair[other] == chosen[other])
                + ")"
            )
        return penalty, weight

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """Config + trainable state only, written to a temporary file and renamed into place.
        Multi-process: global rank 0 writes it at the name all ranks agreed on; the others wait."""
        distributed.save_on_rank_zero(self.config, self._write_checkpoint, epoch, verbose, **kwargs)

    def _write_checkpoint(self, epoch, verbose=True, **kwargs):
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state = {
            "config": self.config,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": {k: v for k, v in self.model.state_dict().items()},
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
        }
        folder = os.path.dirname(os.path.abspath(saved_model_file))
        os.makedirs(folder, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
        os.close(handle)
        try:
            torch.save(state, tmp, pickle_protocol=4)
            os.replace(tmp, saved_model_file)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if self.zero_shot and model_file is None:
            load_best_model = False  # nothing was trained: the model in memory is the model
        with self._progress_of(eval_data), self.model.generator.session():  # buffers kept across its batches
            return super().evaluate(eval_data, load_best_model, model_file, show_progress)

    @contextlib.contextmanager
    def _progress_of(self, eval_data):
        """Counts the evaluated users (RecBole's batch functions, this process's share of the
        batches in a multi-process run) into a progress tracker (:mod:`recbole_llmgen.progress`)."""
        from recbole.data.dataloader import FullSortEvalDataLoader

        world = self.config["world_size"] if distributed.active(self.config) else 1
        rows = len(eval_data._dataset) if eval_data else 0
        unit = "users" if isinstance(eval_data, FullSortEvalDataLoader) else "(user, item) rows"
        counter = progress.tracker("LLMGen: evaluating", -(-rows // world), unit)
        if counter is None:
            yield
            return
        names = ("_full_sort_batch_eval", "_neg_sample_batch_eval")
        for name in names:
            original = getattr(self, name)

            def counted(batched_data, original=original):
                found = original(batched_data)
                counter.advance(len(found[0]))
                return found

            setattr(self, name, counted)
        try:
            yield
        finally:
            for name in names:
                delattr(self, name)  # the class's methods again

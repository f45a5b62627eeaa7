"""Fine-tuning pieces of LLMGen: making the LLM trainable (LoRA or full), the training losses,
the bound on training examples per user, and the checkpoint's identity card.

The losses train exactly what is scored:

* ``likelihood`` / ``generate``: causal-LM loss on the target item's tokens (the same
  ``item_token_ids`` the scorer and the beam search use) after the user's prompt; prompt tokens
  carry no loss. Per example, the mean negative log-probability of the target's tokens, i.e. minus
  the likelihood score; averaged over the batch.
* ``verbalizer``: cross-entropy of the target's label among ``num_candidates`` listed candidates
  (retrieved from ``candidate_source``, target inserted at a random position).

At this CPU's speed (issue 25): :func:`token_nll` runs the output layer and the loss together in
chunks of rows (never the [tokens, vocabulary] logits, their fp32 copy and log-softmax: a third of
a training step before), and :class:`MergedAdapters` merges LoRA into the weights for evaluation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from recbole_llmgen.digests import weights_digest

CHECKPOINT_FORMAT = 2  # 2: the base model is known by its weights' digest (1: its path and 64 embedding rows)
READABLE_FORMATS = (1, 2)


def make_trainable(llm, train_mode: str, lora: dict, gradient_checkpointing: bool):
    """Unfreeze the LLM for ``train_mode`` in place; returns the peft wrapper (LoRA) or None.

    LoRA layers are injected into ``llm`` itself (peft modifies the model in place), so every
    scoring path keeps calling ``llm`` and sees the adapters.
    """
    peft_model = None
    if train_mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            peft_model = get_peft_model(llm, config)
        except ValueError as error:
            names = sorted({name.split(".")[-1] for name, m in llm.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ValueError(
                f"lora_target_modules: {lora['target_modules']!r} does not match this model's layers "
                f"({error}); linear layer names in it: {names}, or 'all-linear'"
            ) from error
    elif train_mode == "full":
        llm.requires_grad_(True)
    if gradient_checkpointing and train_mode != "none":
        # non-reentrant: works with frozen inputs (LoRA) and under DistributedDataParallel
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm.config.use_cache = False
    return peft_model


class MergedAdapters:
    """LoRA adapters merged into the base weights for evaluation, so scoring and generation run at
    the base model's speed (unmerged, every linear layer also runs its two adapter matmuls).

    ``merge()`` keeps an exact copy of each adapted base weight; ``unmerge()`` puts it back
    bit for bit (peft's own unmerge subtracts the update again, which in bf16 does not give the
    original weights back: training would drift with every validation). The adapters themselves
    (the trainable tensors, the checkpoint) are never touched. Costs one copy of the adapted
    weights while merged.
    """

    def __init__(self, llm):
        self.llm = llm
        self.saved: list[tuple[torch.nn.Module, torch.Tensor]] = []

    @property
    def merged(self) -> bool:
        return bool(self.saved)

    @torch.no_grad()
    def merge(self) -> None:
        if self.saved:
            return
        from peft.tuners.lora import LoraLayer

        for module in self.llm.modules():
            if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
                self.saved.append((module, module.get_base_layer().weight.detach().clone()))
                module.merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        for module, weight in self.saved:
            module.get_base_layer().weight.copy_(weight)
            module.merged_adapters.clear()
        self.saved = []


def parameter_key(name: str) -> str:
    """A parameter name usable as a ParameterDict key (no dots)."""
    return name.replace(".", "-")


def trainable_parameters(llm) -> dict[str, torch.nn.Parameter]:
    return {parameter_key(name): p for name, p in llm.named_parameters() if p.requires_grad}


def recent_rows(users: np.ndarray, per_user: int) -> np.ndarray:
    """Indices of each user's last ``per_user`` rows (rows are in time order within a user)."""
    order = np.argsort(users, kind="stable")
    sorted_users = users[order]
    starts = np.r_[0, np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1]
    ends = np.r_[starts[1:], len(users)]
    keep = [order[max(s, e - per_user) : e] for s, e in zip(starts, ends)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def bounded_train_loader(train_data, per_user: int | None):
    """RecBole's training loader limited to each user's most recent ``per_user`` examples.

    Sequential augmentation yields one example per history prefix (~99k on ml-100k); on a CPU
    the most recent few per user are what fits. Returns the loader unchanged when no bound applies.
    """
    from recbole.data.dataloader import TrainDataLoader

    dataset = train_data._dataset
    if not per_user or dataset.uid_field is None:
        return train_data
    users = dataset.inter_feat[dataset.uid_field].numpy()
    keep = recent_rows(users, per_user)
    if len(keep) == len(users):
        return train_data
    subset = dataset.copy(dataset.inter_feat[torch.from_numpy(keep)])
    return TrainDataLoader(train_data.config, subset, train_data._sampler, shuffle=train_data.shuffle)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` [B, T]: every sequence
    ends at the last column, so the tokens to score sit at the same columns for every row."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(list(seq))
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def target_token_nll(llm, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int):
    """Mean negative log-probability of each target's tokens after its prompt. [B]

    Only the target tokens are scored: the prompt is context, never a label. The output layer runs
    only at the positions that predict a target token (:func:`token_nll`).
    """
    device = llm.device
    ids, mask, positions = left_pad([list(p) + list(t) for p, t in zip(prompts, targets)], pad_id, device)
    width = ids.shape[1]
    keep = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    for row, target in enumerate(targets):
        keep[row, width - len(target) - 1 : width - 1] = True  # position j predicts token j + 1
    tokens = torch.tensor([token for target in targets for token in target], device=device)
    nll = token_nll(llm, ids, mask, positions, keep, tokens)  # [N]
    return torch.stack([part.mean() for part in nll.split([len(t) for t in targets])])


def label_cross_entropy(
    llm, prompts: Sequence[Sequence[int]], label_ids: Sequence[int], targets: Sequence[int], pad_id
):
    """Cross-entropy of the target label among the shown candidates' labels, per example. [B]"""
    ids, mask, positions = left_pad(prompts, pad_id, llm.device)
    keep = torch.zeros(ids.shape, dtype=torch.bool, device=llm.device)
    keep[:, -1] = True  # the next token after each prompt (see target_token_nll on why a mask)
    logits = llm(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits  # [B, V]
    label_logits = logits[:, list(label_ids)].float()  # [B, K]
    return F.cross_entropy(label_logits, torch.tensor(list(targets), device=llm.device), reduction="none")


def fingerprint(llm, llm_path: str) -> dict:
    """What identifies the base model: its class, sizes and the digest of its weight files
    (:func:`recbole_llmgen.digests.weights_digest`: the same weights at a moved path agree, other
    weights at the same path do not); the path is kept for messages only, and a hash of the first
    64 embedding rows for checkpoints of format 1."""
    embedding = llm.get_input_embeddings().weight
    sample = embedding.detach()[: min(64, embedding.shape[0])].float().cpu().numpy().tobytes()
    return {
        "llm_path": str(llm_path),
        "architecture": type(llm).__name__,
        "vocab_size": int(embedding.shape[0]),
        "parameters": int(sum(p.numel() for name, p in llm.named_parameters() if "lora_" not in name)),
        "weights_sha1": hashlib.sha1(sample).hexdigest(),
        "weights": weights_digest(llm_path),
    }


def _identity(base: dict) -> tuple[str, ...]:
    """The keys two base models must agree on: the weights' digest (format 2), else what format 1 kept."""
    return ("architecture", "vocab_size", "parameters", "weights" if "weights" in base else "weights_sha1")


def items_fingerprint(dataset_name: str, item_tokens: Sequence[str]) -> dict:
    joined = "\n".join(str(t) for t in item_tokens)
    return {
        "dataset": dataset_name,
        "n_items": len(item_tokens),
        "items_sha1": hashlib.sha1(joined.encode()).hexdigest(),
    }


def check_checkpoint(saved: dict | None, current: dict) -> None:
    """Refuse a checkpoint made for another base model, dataset/item mapping or training setup."""
    if not isinstance(saved, dict) or saved.get("format") not in READABLE_FORMATS:
        raise ValueError(
            "model_file: not an LLMGen checkpoint of this version (no LLMGen metadata in its state_dict); "
            "retrain, or load it with the recbole-llmgen version that wrote it"
        )
    base, here = saved["base_model"], current["base_model"]
    differ = [k for k in _identity(base) if base.get(k) != here.get(k)]
    if differ:
        raise ValueError(
            f"model_file: trained on base model {base['llm_path']!r} ({base['architecture']}, "
            f"{base['parameters']} parameters), but this model loads {here['llm_path']!r} "
            f"({here['architecture']}, {here['parameters']} parameters); they differ in {differ}. "
            f"Set llm_path to the weights it was trained on (they were at {base['llm_path']}) to use this checkpoint"
        )
    items, here_items = saved["items"], current["items"]
    if items != here_items:
        raise ValueError(
            f"model_file: trained on dataset {items['dataset']!r} with {items['n_items']} item ids, but this "
            f"model has dataset {here_items['dataset']!r} with {here_items['n_items']} item ids"
            + (
                " (same name, other item mapping: different filtering or files)"
                if items["dataset"] == here_items["dataset"]
                else ""
            )
        )
    saved = {"objective": "next_item" if saved["train_mode"] != "none" else None, **saved}  # before objectives
    saved = {"item_id_format": "title", **saved}  # before item tokens
    for key in ("item_id_format", "train_mode", "lora", "objective"):
        if saved[key] != current.get(key):
            raise ValueError(
                f"model_file: saved with {key}={saved[key]!r}, but this model has {key}={current.get(key)!r}"
                + (
                    " (llm_train_objective: resume with the objective it was trained with)"
                    if key == "objective"
                    else ""
                )
            )


def item_spans(head: int, item_tokens: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """[start, end) of each item's tokens in a list row that begins with ``head`` header tokens."""
    spans, start = [], head
    for tokens in item_tokens:
        spans.append((start, start + len(tokens)))
        start += len(tokens)
    return spans


def sequence_item_nll(llm, rows: Sequence[Sequence[int]], spans: Sequence[Sequence[tuple[int, int]]], pad_id: int):
    """All-position loss of packed list rows: for every [start, end) span of every row, the mean
    negative log-probability of its tokens given everything before it in the row. [total spans]

    One forward pass trains every item of a window as the next line of the list before it (the way
    SASRec trains every position at once); logits only at the positions that predict a span token.
    Rows are right-padded, positions start at 0, so a span reads exactly what scoring the same item
    after the same tokens reads.
    """
    device = llm.device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    targets, sizes = [], []
    for b, (row, row_spans) in enumerate(zip(rows, spans)):
        ids[b, : len(row)] = torch.tensor(list(row))
        mask[b, : len(row)] = 1
        for start, end in row_spans:
            keep[b, start - 1 : end - 1] = True  # position j predicts token j + 1
            targets.extend(row[start:end])
            sizes.append(end - start)
    positions = torch.arange(width).expand(len(rows), -1)
    nll = token_nll(
        llm,
        ids.to(device),
        mask.to(device),
        positions.to(device),
        keep.to(device),
        torch.tensor(targets, device=device),
    )  # [N], row-major: the spans' tokens in order
    return torch.stack([part.mean() for part in nll.split(sizes)])


# --- the output layer and the loss in one chunked pass -------------------------------------------

LOSS_CHUNK_ROWS = 512  # token rows per chunk: a [512, vocabulary] fp32 block at a time, never [N, vocabulary]


def fused_output_layer(llm):
    """The plain output ``nn.Linear`` (no bias) whose logits are exactly ``hidden @ weight.T``, or
    None when the model does anything else to its logits (an adapter on the output layer, a bias,
    soft-capping, a logit scale): those keep the library's own path."""
    head = llm.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    config = getattr(llm, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return head


class _ChunkedTokenNLL(torch.autograd.Function):
    """``-log softmax(hidden @ weight.T)[target]`` per row, in chunks of rows: the [N, vocabulary]
    logits are never held at once (nor their fp32 copy, log-softmax and its gradient).

    The loss is the graph's last step, so with a frozen output layer (LoRA) the gradient of each
    row's hidden state is computed in the forward pass, while its logits are at hand; the backward
    only scales it. A trainable output layer (full fine-tuning) saves the hidden states and
    recomputes each chunk's logits in the backward instead.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        w = weight.to(dtype)
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] and not ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], LOSS_CHUNK_ROWS):
            end = min(start + LOSS_CHUNK_ROWS, hidden.shape[0])
            nll[start:end], probs = _softmax_nll(hidden[start:end].to(dtype) @ w.T, targets[start:end])
            if grad_hidden is not None:
                grad_hidden[start:end] = (probs.to(dtype) @ w).to(hidden.dtype)
        ctx.dtype = dtype
        ctx.precomputed = grad_hidden is not None
        ctx.save_for_backward(grad_hidden if ctx.precomputed else hidden, weight, targets)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        saved, weight, targets = ctx.saved_tensors
        if ctx.precomputed:
            return saved * grad_nll[:, None].to(saved.dtype), None, None, None
        hidden, dtype = saved, ctx.dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], LOSS_CHUNK_ROWS):
            end = min(start + LOSS_CHUNK_ROWS, hidden.shape[0])
            h = hidden[start:end].to(dtype)
            _, probs = _softmax_nll(h @ w.T, targets[start:end])
            probs = probs.mul_(grad_nll[start:end, None]).to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = (probs @ w).to(hidden.dtype)
            grad_weight += (probs.T @ h).float()
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def _softmax_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(-log softmax(logits)[target], softmax(logits) - onehot(target)) of a chunk, in fp32, the
    chunk's block overwritten in place (few passes over [rows, vocabulary] memory)."""
    logits = logits.float()
    tokens = targets[:, None]
    picked = logits.gather(1, tokens)[:, 0]
    top = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(top).exp_()
    total = exp.sum(dim=-1, keepdim=True)
    nll = top[:, 0] + total[:, 0].log() - picked
    probs = exp.div_(total).scatter_add_(1, tokens, torch.full_like(total, -1.0))
    return nll, probs


def token_nll(llm, ids, mask, positions, keep, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-probability of ``targets`` [N] predicted at the ``keep`` positions [B, T] of the
    rows (row-major). With a plain output layer the decoder's hidden states go through
    :class:`_ChunkedTokenNLL`; otherwise the model's own logits at ``keep`` (same numbers)."""
    head = fused_output_layer(llm)
    if head is None:
        logits = llm(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        return -F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    hidden = llm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[keep]
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else head.weight.dtype
    with torch.autocast(kind, enabled=False):
        return _ChunkedTokenNLL.apply(hidden, head.weight, targets, dtype)

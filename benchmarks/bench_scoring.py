"""LLM scoring speed against this CPU's own peak, fp32 against the auto dtype, in one run.

Real ml-100k prompts (last 10 titles of the first test users), K=20 popularity candidates, the
bundled SmolLM2-135M-Instruct. Measures, in the same process:
  * the matmul peak for fp32 and bf16 at the model's shapes (best of several runs);
  * batched likelihood scoring (several users per pass, candidates as a prefix tree) in fp32 and
    at ``llm_dtype: auto`` (bf16 on a CPU with native bf16): users/s, achieved GFLOP/s, and the
    per-user Spearman correlation of the auto dtype's candidate scores with fp32's;
  * the naive reference (one full pass per candidate, fp32) on a few users: equal scores, speed-up;
  * where one pass's time goes (mask building, transformer layers, lm_head, log-softmax).
Run on an idle machine: python benchmarks/bench_scoring.py [--users 48] [--naive-users 4]
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch


def best_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak_gflops(llm, dtype: torch.dtype, rows: int) -> tuple[float, dict]:
    """Best GFLOP/s of ``[rows, in] x [in, out]`` products at every linear shape of the model."""
    shapes = sorted({(m.in_features, m.out_features) for m in llm.modules() if isinstance(m, torch.nn.Linear)})
    rates = {}
    for fan_in, fan_out in shapes:
        x = torch.randn(rows, fan_in, dtype=dtype)
        w = torch.randn(fan_out, fan_in, dtype=dtype)
        seconds = best_seconds(lambda x=x, w=w: torch.nn.functional.linear(x, w))
        rates[f"{fan_in}x{fan_out}"] = round(2 * rows * fan_in * fan_out / seconds / 1e9, 1)
    return max(rates.values()), rates


def scoring_flops(llm, rows) -> int:
    """Useful FLOPs of scoring ``rows`` (PackedRow): linear layers on every input token, lm_head on
    every read position, attention over the keys each row's queries are laid against."""
    config = llm.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    output = llm.get_output_embeddings()
    head = output.weight.numel()
    linear = sum(m.weight.numel() for m in llm.modules() if isinstance(m, torch.nn.Linear) and m is not output)
    total = 0
    for row, shared in rows:
        tokens = len(row)
        total += (
            2 * linear * tokens + 2 * head * (1 + len(row.nodes)) + 4 * layers * hidden * tokens * (shared + tokens)
        )
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--naive-users", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--llm_path", default="bundled:smollm2")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv

    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed
    from scipy.stats import spearmanr

    import recbole_llmgen
    from recbole_llmgen import scoring
    from recbole_llmgen.candidates import top_candidates

    out = tempfile.mkdtemp(prefix="bench_scoring-")
    torch.set_grad_enabled(False)
    runs = {}
    for dtype in ("float32", "auto"):
        config = Config(
            model="LLMGen",
            dataset="ml-100k",
            config_dict={
                "llm_path": args.llm_path,
                "llm_dtype": dtype,
                "num_candidates": args.candidates,
                "checkpoint_dir": os.path.join(out, "saved"),
                "show_progress": False,
                "state": "ERROR",
            },
        )
        init_seed(config["seed"], config["reproducibility"])
        train_data, _, test_data = data_preparation(config, create_dataset(config))
        model = recbole_llmgen.LLMGen(config, train_data._dataset)
        batch = next(iter(test_data))[0]
        seqs, lens = batch[model.ITEM_SEQ][: args.users], batch[model.ITEM_SEQ_LEN][: args.users]
        candidates = top_candidates(model.retriever.scores(batch[: args.users]), args.candidates).tolist()
        histories = [seqs[b, : lens[b]].tolist() for b in range(len(seqs))]
        prompts = [model.prompts.build(h, c) for h, c in zip(histories, candidates)]
        conts = [[model.prompts.item_token_ids[i] for i in c] for c in candidates]
        common = model.scorer.shared_prefix()
        tokens = model.settings.llm_score_batch_tokens

        def score(model=model, prompts=prompts, conts=conts, common=common, tokens=tokens):
            return scoring.score_continuations(model.llm, prompts, conts, shared=common, batch_tokens=tokens)

        score()  # warm-up
        start = time.perf_counter()
        scores = score()
        seconds = time.perf_counter() - start
        n_shared = len(common.ids)
        rows = [(scoring.prefix_tree_row(p[n_shared:], n_shared, c), n_shared) for p, c in zip(prompts, conts)]
        flops = scoring_flops(model.llm, rows)
        runs[dtype] = {
            "model": model,
            "dtype": str(model.llm.dtype).removeprefix("torch."),
            "seconds": seconds,
            "scores": scores,
            "gflops": flops / seconds / 1e9,
            "rows": rows,
            "prompts": prompts,
            "conts": conts,
            "histories": histories,
            "candidates": candidates,
        }
        print(
            f"{dtype} ({runs[dtype]['dtype']}): {len(prompts) / seconds:.2f} users/s, {flops / seconds / 1e9:.0f} GFLOP/s"
        )

    fp32, auto = runs["float32"], runs["auto"]
    n = len(fp32["prompts"])
    rows = [r for r, _ in auto["rows"]]
    print(
        f"{n} users, K={args.candidates}, threads={torch.get_num_threads()}; per user: shared head "
        f"{auto['rows'][0][1]} tokens (once), prompt {statistics.mean(len(r.prompt) for r in rows):.0f}, "
        f"candidate tokens {statistics.mean(sum(len(c) - 1 for c in cs) for cs in auto['conts']):.0f} packed as "
        f"{statistics.mean(len(r.nodes) for r in rows):.0f} tree nodes, log-softmax rows "
        f"{statistics.mean(1 + len(r.nodes) for r in rows):.0f}"
    )
    rhos = [spearmanr(a.numpy(), b.numpy()).statistic for a, b in zip(fp32["scores"], auto["scores"])]

    # naive reference, fp32: one full forward pass per candidate
    model32 = fp32["model"]
    k = min(args.naive_users, n)
    start = time.perf_counter()
    naive = [scoring.naive_scores(model32.llm, p, c) for p, c in zip(fp32["prompts"][:k], fp32["conts"][:k])]
    naive_s = (time.perf_counter() - start) / k
    diff = max((a - b).abs().max().item() for a, b in zip(naive, fp32["scores"][:k]))

    # verbalizer at the auto dtype, all users batched
    model = auto["model"]
    model.settings.score_method = "verbalizer"
    model.prompts.label_token_ids = model.prompts.label_tokens()
    start = time.perf_counter()
    model.scorer.score(auto["histories"], auto["candidates"])
    verbalizer_s = time.perf_counter() - start

    # where one pass's time goes (auto dtype, the first pass's users)
    llm, common = model.llm, model.scorer.shared_prefix()
    first = scoring._group_passes([r for r, _ in auto["rows"]], model.settings.llm_score_batch_tokens)[0]
    s = len(common.ids)
    ids, positions, mask, keep = scoring.pass_tensors(first, s, 0, llm.dtype)
    build_s = best_seconds(lambda: scoring.pass_tensors(first, s, 0, llm.dtype), 3)
    cache_s = best_seconds(lambda: common.batch_cache(len(first)), 3)

    def layers():
        return llm.base_model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            cache=common.batch_cache(len(first)),
            use_cache=True,
        ).last_hidden_state

    layers_s = best_seconds(layers, 3) - cache_s
    hidden = layers()[keep]
    head_s = best_seconds(lambda: llm.get_output_embeddings()(hidden), 3)
    logits = llm.get_output_embeddings()(hidden)
    index = torch.arange(len(logits))
    softmax_s = best_seconds(lambda: scoring.read_logprobs(logits, index, torch.zeros_like(index)), 3)
    pass_total = build_s + cache_s + layers_s + head_s + softmax_s
    breakdown = {
        "users": len(first),
        "tokens": int(ids.numel()),
        "mask_building_s": round(build_s, 4),
        "prefix_cache_copy_s": round(cache_s, 4),
        "transformer_layers_s": round(layers_s, 4),
        "lm_head_s": round(head_s, 4),
        "log_softmax_s": round(softmax_s, 4),
    }
    print("one pass:", ", ".join(f"{k} {v}" for k, v in breakdown.items()), f"(sum {pass_total:.3f} s)")

    peak32, shapes32 = matmul_peak_gflops(model32.llm, torch.float32, 2048)
    peak_auto, shapes_auto = (
        (peak32, shapes32) if auto["dtype"] == "float32" else matmul_peak_gflops(llm, llm.dtype, 2048)
    )
    print(f"matmul peak fp32 {peak32:.0f} GFLOP/s {shapes32}; {auto['dtype']} {peak_auto:.0f} GFLOP/s {shapes_auto}")
    result = {
        "users": n,
        "candidates": args.candidates,
        "auto_dtype": auto["dtype"],
        "users_per_s_fp32": round(n / fp32["seconds"], 3),
        "users_per_s_auto": round(n / auto["seconds"], 3),
        "speedup_auto_vs_fp32": round(fp32["seconds"] / auto["seconds"], 2),
        "median_spearman_auto_vs_fp32": round(float(statistics.median(rhos)), 4),
        "min_spearman_auto_vs_fp32": round(float(min(rhos)), 4),
        "achieved_gflops": round(auto["gflops"], 1),
        "peak_gflops": round(peak_auto, 1),
        "fraction_of_peak": round(auto["gflops"] / peak_auto, 3),
        "achieved_gflops_fp32": round(fp32["gflops"], 1),
        "peak_gflops_fp32": round(peak32, 1),
        "fraction_of_peak_fp32": round(fp32["gflops"] / peak32, 3),
        "naive_users_per_s_fp32": round(1 / naive_s, 3),
        "speedup_shared_vs_naive": round(naive_s / (fp32["seconds"] / n), 2),
        "max_abs_diff": diff,
        "verbalizer_users_per_s_auto": round(n / verbalizer_s, 3),
        "pass_breakdown": breakdown,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

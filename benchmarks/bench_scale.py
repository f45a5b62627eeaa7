"""How each stage's cost grows with the data: synthetic MovieLens-shaped dumps of ~100k, 1M and 10M
interactions, each stage in a process of its own (its seconds and its peak resident memory).

A synthetic dump has the shape of a real one (MovieLens-1M's format, `::`-separated): power-law
item popularity, user activity from a heavy-tailed distribution (at least 20 items), each user's
items in sessions of one genre at a time (minutes apart within a session, days between sessions),
titles of 2-5 made-up words and a year. Users ~ interactions / 150 and items ~ 1,700 x
(interactions / 100k)^0.4, as MovieLens grows (943 x 1,682 at 100k, 6,040 x 3,706 at 1M,
69,878 x 10,677 at 10M).

Stages, each a fresh Python process (peak = that process's peak resident memory):
  convert       recbole-llmgen's streaming converter, 5-core filter
  build         RecBole's dataset build and data preparation (the benchmark's full-ranking split)
  bpr           BPR trained until validation stops improving (stopping_step 10), or to --bpr-epochs
                epochs at sizes above --converge-up-to; seconds per epoch as well
  sasrec_epoch  SASRec's training epoch, estimated from --sasrec-batches timed batches (sizes up to
                --sasrec-up-to)
  llmgen_eval   LLMGen zero-shot reranking of Pop's top 10, on a seeded sample of --eval-users test users
                (--users-slope: also on its first quarter and half: seconds ~ users^b, b in the row)
  llmgen_train  LLMGen LoRA: building the epoch's training windows, then --train-steps optimizer steps
                (after a warm-up step; llmgen_eval likewise after 8 warm-up users)
One JSON line per size ({"interactions", "users", "items", "<stage>_s", "<stage>_peak_mb", ...}),
kept in --out/scale.jsonl with the sizes measured there before (a stage run again replaces that
stage's figures of its size: sizes and stages can be run separately; each row names the machine,
the LLM stages their dtype), then one line of slopes (log-log least squares of seconds
against interactions, per stage, over every size in scale.jsonl) and ``scale.png`` (cost and peak
memory against size, log-log) in --out.

    python benchmarks/bench_scale.py [--sizes 100000,1000000,10000000] [--eval-users 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
POP_EXPONENT = 1.5
STAGES = ("convert", "build", "bpr", "sasrec_epoch", "llmgen_eval", "llmgen_train")
GENRES = ["Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama", "Fantasy", "Horror",
          "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]  # fmt: skip
SYLLABLES = ["ka", "lo", "mi", "ren", "sa", "tor", "vel", "an", "bri", "cor", "dun", "el", "fa", "gon", "hal",
             "is", "jor", "ke", "lun", "mar", "nor", "ost", "pe", "quin", "ra", "sil", "tem", "ul", "var", "wen"]  # fmt: skip


def shape(interactions: int) -> tuple[int, int]:
    """(users, items) of a MovieLens-like dataset with this many interactions."""
    return max(50, round(interactions / 150)), max(100, round(1700 * (interactions / 100_000) ** 0.4))


def generate(folder: Path, interactions: int, seed: int = 0) -> dict:
    """ratings.dat and movies.dat (MovieLens-1M format) of a synthetic dataset, written in chunks."""
    rng = np.random.default_rng(seed)
    n_users, n_items = shape(interactions)
    folder.mkdir(parents=True, exist_ok=True)
    genre = rng.integers(0, len(GENRES), n_items)
    popularity = 1.0 / (np.arange(n_items) + 5.0) ** POP_EXPONENT  # a power law over a shuffled catalogue
    rng.shuffle(popularity)
    words = np.array([a + b + c for a in SYLLABLES for b in SYLLABLES for c in ("", "n", "s")])
    with open(folder / "movies.dat", "w", encoding="latin-1") as f:
        for item in range(n_items):
            title = " ".join(w.capitalize() for w in rng.choice(words, rng.integers(2, 6)))
            second = GENRES[(genre[item] + 1 + rng.integers(0, len(GENRES) - 1)) % len(GENRES)]
            f.write(f"{item + 1}::{title} ({1930 + rng.integers(0, 90)})::{GENRES[genre[item]]}|{second}\n")
    # activity: heavy-tailed, at least 20 items, at most half the catalogue, scaled to the target total
    extra = rng.pareto(1.5, n_users)
    for _ in range(20):  # scale the tail so the total is the target after the cap at half the catalogue
        activity = np.minimum(20 + extra, n_items / 2)
        extra *= max(interactions - 20 * n_users, 1) / max((activity - 20).sum(), 1)
    activity = np.minimum(20 + extra, n_items / 2).astype(np.int64)
    written = 0
    with open(folder / "ratings.dat", "w", encoding="latin-1") as f:
        for start in range(0, n_users, 500):
            users = range(start, min(start + 500, n_users))
            taste = rng.dirichlet(np.full(len(GENRES), 0.3), len(users))  # [users, genres]
            scores = np.log(popularity)[None, :] + np.log(0.2 / len(GENRES) + 0.8 * taste[:, genre])
            scores += rng.gumbel(size=scores.shape)  # Gumbel top-k: sampling without replacement
            lines = []
            for row, user in enumerate(users):
                k = int(activity[user])
                chosen = np.argpartition(-scores[row], k)[:k]
                # sessions of one genre: the user's genres in a random order, items within in random order
                order = rng.permutation(len(GENRES))[genre[chosen]] + rng.random(k)
                chosen = chosen[np.argsort(order)]
                new_session = np.r_[True, genre[chosen][1:] != genre[chosen][:-1]]
                gaps = np.where(new_session, rng.integers(86_400, 30 * 86_400, k), rng.integers(60, 1_800, k))
                stamps = 956_700_000 + np.cumsum(gaps)
                ratings = np.clip(np.rint(3.6 + rng.normal(0, 1.1, k)), 1, 5).astype(int)
                lines.extend(f"{user + 1}::{i + 1}::{r}::{t}\n" for i, r, t in zip(chosen, ratings, stamps))
            f.writelines(lines)
            written += len(lines)
    return {"users": n_users, "items": n_items, "raw_interactions": written}


# ------------------------------------------------------------------------------ stages (child processes)


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def base_config(data_path: str, out: str, **settings) -> dict:
    from recbole_llmgen.benchmark import split_args

    return {"data_path": data_path, "eval_args": split_args("full"), "checkpoint_dir": os.path.join(out, "saved"),
            "show_progress": False, "state": "ERROR", "seed": 2020, **settings}  # fmt: skip


def stage(name: str, size: int, work: Path, args) -> dict:
    name_of = f"synth-{size}"
    data_path = str(work / "datasets")
    start = time.perf_counter()
    if name == "convert":
        from recbole_llmgen.convert import FilterOptions, convert

        report = convert("movielens", [str(work / f"raw-{size}")], str(work / "datasets" / name_of),
                         filters=FilterOptions(min_user_inter=5, min_item_inter=5), overwrite=True)  # fmt: skip
        return {"seconds": time.perf_counter() - start, "interactions": report.interactions,
                "users": report.users, "items": report.items}  # fmt: skip

    from _harness import prepare

    if name == "build":
        prepare("BPR", name_of, base_config(data_path, str(work)))
        return {"seconds": time.perf_counter() - start}
    if name in ("bpr", "sasrec_epoch"):
        from recbole.utils import get_trainer

        model_name = "BPR" if name == "bpr" else "SASRec"
        converge = name == "bpr" and size <= args.converge_up_to
        settings = {"epochs": 300 if converge else args.bpr_epochs, "stopping_step": 10}
        if name == "sasrec_epoch":
            settings = {"epochs": 1, "train_neg_sample_args": None}
        config, train, valid, test = prepare(model_name, name_of, base_config(data_path, str(work), **settings))
        built = time.perf_counter()
        from recbole.utils import get_model

        model = get_model(model_name)(config, train._dataset)
        trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)
        if name == "sasrec_epoch":  # the first --sasrec-batches batches, after one warm-up batch: an epoch's estimate
            from recbole.data.dataloader import TrainDataLoader

            def first(rows):
                subset = train._dataset.copy(train._dataset.inter_feat[torch.arange(min(rows, len(train._dataset)))])
                return TrainDataLoader(config, subset, None, shuffle=False)

            batch = config["train_batch_size"]
            trainer._train_epoch(first(batch), 0, show_progress=False)
            timed = first(args.sasrec_batches * batch)
            epoch_start = time.perf_counter()
            trainer._train_epoch(timed, 0, show_progress=False)
            seconds = time.perf_counter() - epoch_start
            return {"seconds": seconds * len(train._dataset) / len(timed._dataset), "build_s": built - start,
                    "timed_rows": len(timed._dataset), "epoch_rows": len(train._dataset)}  # fmt: skip
        epochs = []
        original = trainer._train_epoch

        def timed_epoch(*a, **k):
            t = time.perf_counter()
            loss = original(*a, **k)
            epochs.append(time.perf_counter() - t)
            return loss

        trainer._train_epoch = timed_epoch
        trainer.fit(train, valid, saved=False, show_progress=False)
        result = trainer.evaluate(test, load_best_model=False, show_progress=False)
        return {"seconds": time.perf_counter() - built, "build_s": built - start, "epochs": len(epochs),
                "epoch_s": float(np.median(epochs)),
                "converged": converge, "test_ndcg@10": round(float(result["ndcg@10"]), 4)}  # fmt: skip
    if name == "llmgen_eval":
        from recbole.utils import get_trainer, init_seed

        from recbole_llmgen.integration import build_model, only_users

        config, train, valid, test = prepare("LLMGen", name_of, base_config(data_path, str(work), candidate_source="pop",
                                                                           num_candidates=10, max_history_items=5))  # fmt: skip
        dataset = test._dataset
        users = dataset.id2token(dataset.uid_field, np.unique(dataset.inter_feat[dataset.uid_field].numpy()))
        sample = np.random.default_rng(2020).choice(users, size=min(args.eval_users, len(users)), replace=False)
        model = build_model(config, train)
        trainer = get_trainer(config["MODEL_TYPE"], "LLMGen")(config, model)
        trainer.evaluate(only_users(test, sample[:8]), load_best_model=False, show_progress=False)  # warm-up
        built = time.perf_counter()
        # --users-slope: the first quarter and half of the sample too, each evaluated alone (nested samples)
        counts = [len(sample) // 4, len(sample) // 2, len(sample)] if args.users_slope else [len(sample)]
        timed = {}
        for count in (c for c in counts if c >= 1):
            init_seed(config["seed"], config["reproducibility"])
            begin = time.perf_counter()
            result = trainer.evaluate(only_users(test, sample[:count]), load_best_model=False, show_progress=False)
            timed[count] = time.perf_counter() - begin
        seconds = timed[len(sample)]
        extra = {}
        if len(timed) >= 2:  # the exponent b in seconds ~ users^b
            x, y = np.log(list(timed)), np.log(list(timed.values()))
            extra = {"users_slope": round(float(np.polyfit(x, y, 1)[0]), 2),
                     "s_at_users": {str(c): round(t, 1) for c, t in timed.items()}}  # fmt: skip
        return {"seconds": seconds, "build_s": built - start, "eval_users": len(sample),
                "s_per_user": seconds / len(sample), "test_ndcg@10": round(float(result["ndcg@10"]), 4),
                "llm_dtype": str(model.llm.dtype).removeprefix("torch."), **extra}  # fmt: skip
    if name == "llmgen_train":
        from recbole_llmgen import sequence
        from recbole_llmgen.integration import build_model
        from recbole_llmgen.trainer import LLMGenTrainer

        settings = dict(train_mode="lora", lora_r=16, lora_alpha=32, prompt_format="list", llm_train_objective="sequence",
                        max_history_items=20, train_batch_size=8, llm_train_batch_size=8, candidate_source="pop")  # fmt: skip
        config, train, _, _ = prepare("LLMGen", name_of, base_config(data_path, str(work), **settings))
        model = build_model(config, train)
        trainer = LLMGenTrainer(config, model)
        built = time.perf_counter()
        windows = sequence.window_loader(train, model, config["train_batch_size"], int(config["seed"]))
        windows_s = time.perf_counter() - built
        chosen = windows.items[: args.train_steps * config["train_batch_size"]]
        lengths = [model.prompts.list_length(w) for w in chosen]
        steps = sequence.WindowLoader(train._dataset, chosen, lengths, config["train_batch_size"], 0)
        warm = windows.items[-config["train_batch_size"] :]
        trainer._train_epoch(
            sequence.WindowLoader(
                train._dataset, warm, [model.prompts.list_length(w) for w in warm], config["train_batch_size"], 0
            ),
            0,
        )  # fmt: skip  (warm-up step)
        step_start = time.perf_counter()
        trainer._train_epoch(steps, 0)
        return {"seconds": time.perf_counter() - step_start, "build_s": built - start, "windows_s": windows_s,
                "windows": len(windows.items), "steps": args.train_steps,
                "compute_dtype": str(model.autocast_dtype or model.llm.dtype).removeprefix("torch.")}  # fmt: skip
    raise ValueError(f"--stage: {name!r} is not one of {', '.join(STAGES)}")


# ------------------------------------------------------------------------------ parent


def run_stage(name: str, size: int, work: Path, args) -> dict:
    command = [sys.executable, __file__, "--stage", name, "--size", str(size), "--work", str(work),
               "--eval-users", str(args.eval_users), "--train-steps", str(args.train_steps),
               "--bpr-epochs", str(args.bpr_epochs), "--converge-up-to", str(args.converge_up_to),
               "--sasrec-batches", str(args.sasrec_batches)] + ["--users-slope"] * args.users_slope  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=work)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout)[-2000:]
        return {"error": f"exit {done.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}
    return json.loads(lines[-1])


def merged(kept: list[dict], row: dict, stages: list[str]) -> dict:
    """The size's row in scale.jsonl after this run: its earlier figures for the stages not run
    again, this run's for the stages run (an earlier error or figure of a rerun stage is dropped)."""
    old = next((r for r in kept if r["size"] == row["size"]), {})
    rerun = tuple(f"{name}_" for name in stages)
    return {**{k: v for k, v in old.items() if not k.startswith(rerun)}, **row}


def slopes(rows: list[dict]) -> dict:
    """Per stage: the exponent b of seconds ~ interactions^b (least squares on logs)."""
    result = {}
    for name in STAGES:
        points = [(r["interactions"], r[f"{name}_s"]) for r in rows if r.get(f"{name}_s")]
        if len(points) >= 2:
            x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
            result[name] = round(float(np.polyfit(x, y, 1)[0]), 2)
    return result


def plot(rows: list[dict], fitted: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in STAGES:
        points = [(r["interactions"], r[f"{name}_s"], r.get(f"{name}_peak_mb")) for r in rows if r.get(f"{name}_s")]
        if not points:
            continue
        x, seconds, memory = zip(*points)
        label = f"{name} (slope {fitted[name]})" if name in fitted else name
        left.plot(x, seconds, marker="o", label=label)
        right.plot(x, [m / 1024 for m in memory], marker="o", label=name)
    for axis, title in ((left, "seconds"), (right, "peak memory, GiB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("interactions")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000,10000000", help="interactions per synthetic dataset")
    parser.add_argument("--stages", default=",".join(STAGES), help="a subset of " + ", ".join(STAGES))
    parser.add_argument("--eval-users", type=int, default=1000, help="LLMGen's evaluated test users per size")
    parser.add_argument("--train-steps", type=int, default=4, help="LLMGen LoRA steps timed per size")
    parser.add_argument("--bpr-epochs", type=int, default=2, help="BPR's epochs above --converge-up-to")
    parser.add_argument("--converge-up-to", type=int, default=1_000_000, help="BPR converges up to this size")
    parser.add_argument("--sasrec-up-to", type=int, default=1_000_000, help="SASRec's epoch up to this size")
    parser.add_argument("--sasrec-batches", type=int, default=20, help="SASRec batches timed for the epoch estimate")
    parser.add_argument("--users-slope", action="store_true",
                        help="llmgen_eval also on the first quarter and half of its users: the slope in users")  # fmt: skip
    parser.add_argument("--out", default="results/bench-scale", help="work folder: raw dumps, datasets, plot")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from sys.argv

    if args.stage:  # a child: one stage, one JSON line
        sys.path.insert(0, str(HERE))
        import recbole_llmgen  # noqa: F401  (compatibility fixes, LLMGen registered)

        result = stage(args.stage, args.size, Path(args.work), args)
        print(json.dumps({**result, "peak_mb": round(peak_mb())}), flush=True)
        return

    from recbole_llmgen.llm import describe_machine

    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    wanted = args.stages.split(",")
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        parser.error(f"--stages: {unknown} are not among {', '.join(STAGES)}")
    record = work / "scale.jsonl"  # every size measured in this folder: a stage run again replaces its figures
    kept = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        row = {"size": size, "machine": describe_machine("cpu")}  # the LLM's dtype: llmgen_*_llm_dtype
        start = time.perf_counter()
        raw = work / f"raw-{size}"
        if not (raw / "ratings.dat").exists():
            row.update(generate(raw, size))
        row["generate_s"] = round(time.perf_counter() - start, 1)
        row["raw_mb"] = round((raw / "ratings.dat").stat().st_size / 2**20, 1)
        for name in wanted:
            if name == "sasrec_epoch" and size > args.sasrec_up_to:
                continue
            if name != "convert" and not (work / "datasets" / f"synth-{size}").exists():
                row[f"{name}_error"] = "no converted dataset"
                continue
            result = run_stage(name, size, work, args)
            if "error" in result:
                row[f"{name}_error"] = result["error"]
                print(f"  {size}: {name} failed: {result['error']}", file=sys.stderr, flush=True)
                continue
            row[f"{name}_s"] = round(result.pop("seconds"), 1)
            row[f"{name}_peak_mb"] = result.pop("peak_mb")
            for key, value in result.items():
                if key in ("interactions", "users", "items"):
                    row[key] = value
                else:
                    row[f"{name}_{key}"] = round(value, 4) if isinstance(value, float) else value
            print(f"  {size}: {name} {row[f'{name}_s']} s, peak {row[f'{name}_peak_mb']} MB", file=sys.stderr,
                  flush=True)  # fmt: skip
        row.setdefault("interactions", size)
        rows.append(row)
        print(json.dumps(row), flush=True)
        kept = sorted([r for r in kept if r["size"] != size] + [merged(kept, row, wanted)], key=lambda r: r["size"])
        record.write_text("".join(json.dumps(r) + "\n" for r in kept))
    fitted = slopes(kept)
    print(json.dumps({"slopes": fitted, "sizes": [r["interactions"] for r in kept]}), flush=True)
    if len(kept) >= 2:
        plot(kept, fitted, work / "scale.png")


if __name__ == "__main__":
    main()

"""The ``recbole-llmgen`` command (also ``python -m recbole_llmgen``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import yaml

from recbole_llmgen import per_user, seen_items, text
from recbole_llmgen.benchmark import DEFAULT_MODELS, PROTOCOLS

TRAIN_FEEDBACK_HELP = (
    "feedback files of chats: liked items join the training split (never valid or test), dislikes are not trained on"
)
FEEDBACK_HELP = "feedback files of earlier chats: liked items join the history, disliked ones are never proposed"


def parse_overrides(items: list[str]) -> dict:
    """``--key=value`` arguments to a config dict; values parsed as YAML (5 -> int, [a,b] -> list)."""
    overrides = {}
    for item in items:
        if not item.startswith("--") or "=" not in item:
            raise SystemExit(f"recbole-llmgen: unrecognised argument {item!r}; config overrides look like --key=value")
        key, value = item[2:].split("=", 1)
        try:
            overrides[key] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            overrides[key] = value
    return overrides


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recbole-llmgen", description="LLM recommenders inside RecBole.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="train and evaluate one model (LLMGen or any RecBole built-in) on a dataset",
        epilog="Any --key=value is a RecBole/LLMGen config override, e.g. --num_candidates=20.",
    )
    run.add_argument("--model", "-m", default=None, help="model name (default: the config files', else LLMGen)")
    run.add_argument("--dataset", "-d", default=None, help="dataset name (default: the config files', else ml-100k)")
    run.add_argument("--config_files", nargs="+", default=None, help="yaml config files")
    run.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    run.add_argument("--no-save", action="store_true", help="do not write a checkpoint")
    run.add_argument("--feedback", nargs="+", default=None, metavar="FILE", help=TRAIN_FEEDBACK_HELP)
    run.add_argument("--nproc", type=int, default=1, help="processes on this machine (gloo on CPUs, one GPU each)")
    run.add_argument("--world_size", type=int, default=-1, help="processes on all machines (default: nproc)")
    run.add_argument("--ip", default="localhost", help="address of the machine running rank 0")
    run.add_argument("--port", default="5678", help="a free port on that machine")
    run.add_argument("--group_offset", type=int, default=0, help="global rank of this machine's first process")

    rec = sub.add_parser("recommend", help="top-k recommendations (with explanations) for given users")
    rec.add_argument("--dataset", "-d", default=None, help="dataset name (default: the model file's)")
    rec.add_argument("--user", action="append", default=None, help="a user id of the dataset (repeatable)")
    rec.add_argument(
        "--request", default=None, help="what the user asks for, in their own words (no --user: a new user)"
    )
    rec.add_argument("--topk", type=int, default=10)
    rec.add_argument("--explain", action="store_true", help="one or two sentences per item from the LLM")
    rec.add_argument("--feedback", nargs="+", default=None, metavar="FILE", help=FEEDBACK_HELP)
    rec.add_argument(
        "--model-file", default=None, help="a saved checkpoint: LLMGen or any RecBole model (saved/MODEL-*.pth)"
    )
    rec.add_argument("--model", "-m", default="LLMGen")
    rec.add_argument("--config_files", nargs="+", default=None)
    rec.add_argument("--json", default=None, metavar="PATH", help="write the rows as a JSON list")

    chat = sub.add_parser(
        "chat",
        help="an interactive session: type a request, see a list, give feedback (like 3, dislike 5, ...)",
        epilog="Any --key=value is a config override. Commands in the session: " + text.CHAT_COMMANDS,
    )
    chat.add_argument("--dataset", "-d", default=None, help="dataset name (default: the model file's)")
    chat.add_argument("--user", default=None, help="a user id of the dataset (default: a new user, no history)")
    chat.add_argument("--model-file", default=None, help="a saved LLMGen checkpoint (saved/LLMGen-*.pth)")
    chat.add_argument("--model", "-m", default="LLMGen")
    chat.add_argument("--config_files", nargs="+", default=None)
    chat.add_argument("--topk", type=int, default=10)
    chat.add_argument("--explain", action="store_true", help="one sentence per item from the LLM (slower)")
    chat.add_argument("--feedback", nargs="+", default=None, metavar="FILE", help=FEEDBACK_HELP)
    chat.add_argument(
        "--save-feedback", default=None, metavar="PATH", help="likes and dislikes as RecBole atomic .inter"
    )

    bench = sub.add_parser(
        "benchmark",
        help="LLMGen beside Pop, BPR, SASRec... on one split: benchmark.csv, .md and .png",
        epilog="Any --key=value is a config override for every model (e.g. --train_mode=lora for LLMGen).",
    )
    bench.add_argument("--dataset", "-d", default="ml-100k")
    bench.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    bench.add_argument("--protocol", default="full", choices=list(PROTOCOLS), help="full ranking or LLMRank's uni19")
    bench.add_argument("--config_files", nargs="+", default=None, help="yaml config files (every model)")
    bench.add_argument("--feedback", nargs="+", default=None, metavar="FILE", help=TRAIN_FEEDBACK_HELP)
    bench.add_argument("--out", default=None, help="output folder (default: results/benchmark-DATASET-PROTOCOL)")
    bench.add_argument(
        "--seen_items",
        default=None,
        choices=list(seen_items.RULES),
        help="ranking rule of every row: mask (default) never ranks an item the user saw before the evaluated one, "
        "keep ranks every item",
    )
    bench.add_argument(
        "--llm-valid", action="store_true", help="also evaluate zero-shot LLMGen on the valid split (doubles its time)"
    )
    bench.add_argument(
        "--llm-nproc",
        default="1",
        help="processes for LLMGen (same metrics, evaluation split between them); auto = min(2, CPU cores)",
    )
    bench.add_argument(
        "--train_fraction", type=float, default=None, help="keep this seeded share (0, 1] of each user's training data"
    )
    bench.add_argument("--cold_users", type=int, default=None, help="evaluate users with <= N training interactions")
    bench.add_argument(
        "--cold_items", type=int, default=None, help="evaluate test targets with <= N training interactions"
    )
    bench.add_argument(
        "--requests", action="store_true", help="also the request protocol (genre requests on ml-100k): requests.md"
    )
    bench.add_argument(
        "--eval_users",
        type=int,
        default=None,
        metavar="N",
        help="evaluate a seeded sample of N test users (the same for every model; training uses all data)",
    )
    bench.add_argument(
        "--sweep",
        default=None,
        metavar="KEY=V1,V2,...",
        help="one benchmark per value of train_fraction, cold_users or cold_items: sweep.csv, .md, .png",
    )

    tune = sub.add_parser(
        "tune",
        help="RecBole's hyper-parameter search over any model's keys: tune.csv, tune.md, best.yaml",
        epilog="Any --key=value is a fixed config override for every trial.",
    )
    tune.add_argument("--model", "-m", default="LLMGen")
    tune.add_argument("--dataset", "-d", default="ml-100k")
    tune.add_argument("--params_file", required=True, help="RecBole's format: 'name choice [a,b]' per line")
    tune.add_argument("--algo", default="exhaustive", help="exhaustive | random | bayes")
    tune.add_argument("--max_evals", type=int, default=100, help="trials for random and bayes")
    tune.add_argument("--config_files", nargs="+", default=None)
    tune.add_argument("--out", default=None, help="output folder (default: results/tune-MODEL-DATASET)")

    comp = sub.add_parser(
        "compare",
        help="paired bootstrap difference of two finished model runs on the same users",
        epilog="A run is DIR/runs/MODEL (or its MODEL.users.csv) of a benchmark; prints A - B per metric.",
    )
    comp.add_argument("run_a", help="e.g. results/benchmark-ml-100k-full/runs/LLMGen")
    comp.add_argument("run_b", help="e.g. results/benchmark-ml-100k-full/runs/BPR")
    comp.add_argument("--metrics", default="ndcg@10,hit@10", help="comma-separated metrics (default: ndcg@10,hit@10)")
    comp.add_argument("--resamples", type=int, default=per_user.RESAMPLES)
    comp.add_argument("--seed", type=int, default=per_user.SEED)

    conv = sub.add_parser("convert", help="raw MovieLens / Amazon / CSV dumps to RecBole atomic files with item text")
    conv.add_argument("format", choices=["movielens", "amazon", "csv"])
    conv.add_argument("--input", nargs="+", required=True, help="raw files or folders")
    conv.add_argument("--output", required=True, help="datasets/NAME: writes NAME.inter and NAME.item there")
    conv.add_argument("--min-user-inter", type=int, default=0, help="k-core: minimum interactions per user")
    conv.add_argument("--min-item-inter", type=int, default=0, help="k-core: minimum interactions per item")
    conv.add_argument("--rating-threshold", type=float, default=None, help="keep ratings >= this (implicit feedback)")
    conv.add_argument("--keep-duplicates", action="store_true", help="keep repeated (user, item) pairs")
    conv.add_argument("--strict", action="store_true", help="fail on the first malformed row")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    conv.add_argument("--user-col", default="user_id", help="csv: user column")
    conv.add_argument("--item-col", default="item_id", help="csv: item column")
    conv.add_argument("--rating-col", default="rating", help="csv: rating column ('' for none)")
    conv.add_argument("--time-col", default="timestamp", help="csv: time column, number or date ('' for none)")
    conv.add_argument("--items", default=None, help="csv: items file")
    conv.add_argument("--item-id-col", default=None, help="csv: item id column of the items file")
    conv.add_argument("--text-cols", default="title", help="csv: comma-separated text columns of the items file")
    conv.add_argument("--sep", default=",", help="csv: field separator")
    return parser


def _from_config_files(paths) -> dict:
    merged = {}
    for path in paths or []:
        try:
            with open(path, encoding="utf-8") as f:
                merged.update(yaml.safe_load(f) or {})
        except FileNotFoundError as error:
            raise SystemExit(f"recbole-llmgen: --config_files: {path!r} does not exist") from error
    return merged


def _chat(args, overrides: dict, stdin=None, stdout=None) -> int:
    """``recbole-llmgen chat``: read lines, answer each with a message and/or a numbered list."""
    from recbole_llmgen.conversation import Session, format_rows
    from recbole_llmgen.feedback import check_feedback_file
    from recbole_llmgen.integration import recbole_argv

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if args.dataset is None and args.model_file is None:
        raise SystemExit("recbole-llmgen chat: give --dataset or --model-file")
    try:
        with recbole_argv():
            session = Session.open(args.dataset, args.user, args.model_file, args.config_files, overrides or None,
                                   args.topk, args.explain, args.model, feedback=args.feedback)  # fmt: skip
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"recbole-llmgen chat: {error}") from None
    if args.save_feedback:  # a file we may not append to is refused now, before anything is said
        try:
            check_feedback_file(args.save_feedback, session.feedback_header())
        except ValueError as error:
            raise SystemExit(f"recbole-llmgen chat: {error}") from None
    session.feedback_path = args.save_feedback
    who = f"user {args.user} ({len(session.history)} items in the history)" if args.user else "a new user"
    print(f"recbole-llmgen chat with {who}. {text.CHAT_HELP}", file=stdout, flush=True)
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break  # end of input: like quit
        start = time.perf_counter()
        reply = session.handle(line)
        if not interactive:
            print(f"> {line.rstrip()}", file=stdout)
        if reply.message:
            print(reply.message, file=stdout)
        if reply.rows:
            print(format_rows(reply.rows), file=stdout)
            print(f"({time.perf_counter() - start:.1f} s)", file=stdout)
        stdout.flush()
        if reply.done:
            break
    if args.save_feedback:
        saved = session.save_feedback(args.save_feedback)
        told = (
            f"{len(session.events)} rows added to {saved}" if saved else f"nothing said, {args.save_feedback} untouched"
        )
        print(f"feedback: {told}", file=stdout)
    return 0


def _recommend(args, overrides: dict) -> int:
    from recbole_llmgen.integration import recbole_argv
    from recbole_llmgen.recommend import format_table, recommend

    if args.dataset is None and args.model_file is None:
        raise SystemExit("recbole-llmgen recommend: give --dataset or --model-file")
    if not args.user and args.request is None:
        raise SystemExit("recbole-llmgen recommend: give --user (repeatable), or --request for a new user")
    try:
        with recbole_argv():
            frame = recommend(
                args.user,
                topk=args.topk,
                dataset=args.dataset,
                config_file_list=args.config_files,
                config_dict=overrides or None,
                model_file=args.model_file,
                explain=args.explain,
                model=args.model,
                request=args.request,
                feedback=args.feedback,
            )
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"recbole-llmgen recommend: {error}") from None
    print(format_table(frame))
    if args.json:
        frame.to_json(args.json, orient="records", indent=2, force_ascii=False)
    return 0


def _convert(args) -> int:
    from recbole_llmgen.convert import ConversionError, CsvOptions, FilterOptions, convert

    filters = FilterOptions(args.min_user_inter, args.min_item_inter, args.rating_threshold, not args.keep_duplicates)
    csv_options = CsvOptions(
        user_col=args.user_col,
        item_col=args.item_col,
        rating_col=args.rating_col or None,
        time_col=args.time_col or None,
        items=args.items,
        item_id_col=args.item_id_col,
        text_cols=[c for c in args.text_cols.split(",") if c],
        sep=args.sep,
    )
    try:
        report = convert(args.format, args.input, args.output, filters, csv_options, args.strict, args.overwrite)
    except ConversionError as error:
        print(f"recbole-llmgen convert: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


def _llm_nproc(value: str) -> int:
    # auto: measured on 2 cores, full ml-100k test split: 2 one-thread processes evaluate 1.27x (fp32)
    # and 1.14x (bf16) faster than 1 two-thread one
    if value == "auto":
        return max(1, min(2, os.cpu_count() or 1))
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"recbole-llmgen benchmark: --llm-nproc: expected a number or 'auto', got {value!r}") from None


def _compare(args) -> int:
    """``recbole-llmgen compare A B``: A - B per metric with its paired bootstrap interval."""
    if args.resamples < 1:
        raise SystemExit(f"recbole-llmgen compare: --resamples: expected an integer >= 1, got {args.resamples}")
    names = (os.path.basename(per_user.users_file(args.run_a)), os.path.basename(per_user.users_file(args.run_b)))
    try:
        a, b = per_user.read_users(args.run_a), per_user.read_users(args.run_b)
        print(f"{names[0]} - {names[1]} on {len(a)} users ({args.resamples} paired resamples, seed {args.seed}):")
        for metric in [m.strip() for m in args.metrics.split(",") if m.strip()]:
            x, y = per_user.aligned(a, b, metric, names)
            mean, low, high = per_user.paired_difference(x, y, args.resamples, args.seed)
            verdict = "excludes 0" if low > 0 or high < 0 else "includes 0: no difference shown"
            print(
                f"  {metric}: {x.mean():.4f} - {y.mean():.4f} = {mean:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}] "
                f"({verdict})"
            )
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"recbole-llmgen compare: {error}") from None
    return 0


def _feedback_files(paths: list[str], command: str) -> list[str]:
    """``--feedback`` of run/benchmark, checked before any data is read."""
    from recbole_llmgen.feedback import check_config

    try:
        return check_config(paths)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"recbole-llmgen {command}: {error}") from None


def _benchmark(args, overrides: dict) -> int:
    """``recbole-llmgen benchmark``: one run, or with ``--sweep`` one run per value of a regime option."""
    from recbole_llmgen.benchmark import run_benchmark
    from recbole_llmgen.regime import check_regime
    from recbole_llmgen.sweep import parse_sweep, run_sweep

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.seen_items is not None:
        overrides = {**overrides, "seen_items": args.seen_items}
    if args.feedback:  # every row trains on the same feedback (recbole_llmgen.feedback)
        overrides = {**overrides, "feedback": _feedback_files(args.feedback, "benchmark")}
    options = {"train_fraction": args.train_fraction, "cold_users": args.cold_users, "cold_items": args.cold_items}
    common = {"llm_valid": args.llm_valid, "llm_nproc": _llm_nproc(args.llm_nproc), "requests": args.requests}
    if args.eval_users is not None:
        common["eval_users"] = args.eval_users
    start = time.perf_counter()
    try:
        if args.sweep:
            key, values = parse_sweep(args.sweep)
            out = args.out or f"results/sweep-{args.dataset}-{key}"
            rows = run_sweep(
                key, values, args.dataset, models, args.protocol, args.config_files, overrides, out, base=options,
                **common,
            )  # fmt: skip
            table = os.path.join(out, "sweep.md")
        else:
            out = args.out or f"results/benchmark-{args.dataset}-{args.protocol}"
            rows = run_benchmark(
                args.dataset, models, args.protocol, args.config_files, overrides, out, regime=check_regime(**options),
                **common,
            )  # fmt: skip
            table = os.path.join(out, "benchmark.md")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"recbole-llmgen benchmark: {error}") from None
    print(open(table, encoding="utf-8").read())
    if args.requests and os.path.isfile(os.path.join(out, "requests.md")):
        print(open(os.path.join(out, "requests.md"), encoding="utf-8").read())
    print(f"wrote {table} (and .csv, .png) in {time.perf_counter() - start:.0f} s")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def quiet_libraries() -> None:
    """The console shows the user our output, not RecBole's pandas FutureWarnings (RecBole 1.2.1
    predates pandas 2.2's deprecations; pandas<3 is pinned) or a progress bar per model load."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"pandas(\.|$)")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("convert", "compare"):
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _convert(args) if args.command == "convert" else _compare(args)
    overrides = parse_overrides(rest)
    if args.command == "recommend":
        return _recommend(args, overrides)
    if args.command == "chat":
        return _chat(args, overrides)
    if args.command == "benchmark":
        return _benchmark(args, overrides)
    if args.command == "tune":
        from recbole_llmgen.tune import run_tune

        out = args.out or f"results/tune-{args.model}-{args.dataset}"
        try:
            rows = run_tune(
                args.model, args.dataset, args.params_file, args.algo, args.max_evals, args.config_files, overrides, out
            )
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"recbole-llmgen tune: {error}") from None
        print(open(os.path.join(out, "tune.md"), encoding="utf-8").read())
        print(
            f"wrote {out}/tune.csv, tune.md" + (", best.yaml" if os.path.isfile(os.path.join(out, "best.yaml")) else "")
        )
        return 0 if any(r.get("status") == "ok" for r in rows) else 1
    if args.command == "run":
        from recbole_llmgen.integration import recbole_argv
        from recbole_llmgen.quick_start import run_recbole

        from_files = _from_config_files(args.config_files)
        args.model = args.model or overrides.pop("model", None) or from_files.get("model") or "LLMGen"
        args.dataset = args.dataset or overrides.pop("dataset", None) or from_files.get("dataset") or "ml-100k"
        if args.feedback:  # liked items join the training split (recbole_llmgen.feedback)
            overrides["feedback"] = _feedback_files(args.feedback, "run")

        start = time.perf_counter()
        with recbole_argv():
            result = run_recbole(
                model=args.model,
                dataset=args.dataset,
                config_file_list=args.config_files,
                config_dict=overrides,
                saved=not args.no_save,
                nproc=args.nproc,
                world_size=args.world_size,
                ip=args.ip,
                port=args.port,
                group_offset=args.group_offset,
            )
        seconds = time.perf_counter() - start
        summary = {
            "model": args.model,
            "dataset": args.dataset,
            "best_valid_result": _jsonable(result["best_valid_result"]),
            "test_result": _jsonable(result["test_result"]),
            "seconds": round(seconds, 2),
        }
        print(json.dumps(summary, indent=2))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

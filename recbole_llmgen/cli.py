"""The ``recbole-llmgen`` command (also ``python -m recbole_llmgen``)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import yaml


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
    run.add_argument("--model", "-m", default="LLMGen", help="model name (default: LLMGen)")
    run.add_argument("--dataset", "-d", default="ml-100k", help="dataset name (default: ml-100k)")
    run.add_argument("--config_files", nargs="+", default=None, help="yaml config files")
    run.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    run.add_argument("--no-save", action="store_true", help="do not write a checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.command == "run":
        from recbole_llmgen.quick_start import recbole_argv, run_recbole

        start = time.perf_counter()
        with recbole_argv():
            result = run_recbole(
                model=args.model,
                dataset=args.dataset,
                config_file_list=args.config_files,
                config_dict=overrides,
                saved=not args.no_save,
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

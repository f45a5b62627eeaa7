"""Which row LLMGen builds on: the candidate source that validates best, among the classic models
and the text retriever; and the rows a run gives (a fused LLMGen adds its LLM-only ranking)."""

from __future__ import annotations

from recbole_llmgen.benchmark.plan import TEXT_RETRIEVER, TEXT_RETRIEVER_CONFIG


def expand(row: dict) -> list[dict]:
    """A run's row, then a row per variant (a fused LLMGen's LLM-only ranking), sharing its training."""
    variants = row.get("variants") or []
    shared = {k: v for k, v in row.items() if not k.startswith(("valid_", "test_")) and k != "variants"}
    return [{k: v for k, v in row.items() if k != "variants"}] + [{**shared, **variant} for variant in variants]


def row_name(row: dict) -> str:
    """The model, plus the variant when one run gives several rows ("LLMGen", "LLMGen LLM only")."""
    return f"{row['model']} {row['variant']}" if row.get("variant") and row["variant"] != "fused" else row["model"]


def best_classic(rows: list[dict]) -> dict | None:
    """The classic model with the best validation score (one with a model file)."""
    done = [r for r in rows if r["model"] not in ("LLMGen", TEXT_RETRIEVER) and r.get("status") == "ok"]
    done = [r for r in done if r.get("model_file")]
    return max(done, key=lambda r: r.get("best_valid_score") or float("-inf")) if done else None


def best_candidate(rows: list[dict]) -> dict | None:
    """LLMGen's default candidate source: the classic model or the text retriever with the best
    validation score (a tie goes to the classic model: it comes first)."""
    done = [r for r in rows if r["model"] == TEXT_RETRIEVER and r.get("status") == "ok"]
    done = [r for r in (best_classic(rows), *done) if r is not None and r.get("best_valid_score") is not None]
    return max(done, key=lambda r: r["best_valid_score"]) if done else best_classic(rows)


def candidate_source_of(row: dict) -> str:
    """The ``candidate_source`` value that reranks ``row``'s ranking."""
    return TEXT_RETRIEVER_CONFIG["candidate_source"] if row["model"] == TEXT_RETRIEVER else row["model_file"]

"""``recbole-llmgen benchmark``: LLMGen beside RecBole's classic models, one split, one evaluator,
one ranking rule.

Every model runs through RecBole (its Config, data preparation, trainer and evaluator) on the same
dataset, leave-one-out split in time order, seed, columns and ``seen_items`` rule (mask: no model
ranks an item its user saw before the evaluated one; :mod:`recbole_llmgen.seen_items`). Each model
runs in its own process and its result is kept in ``OUT/runs/<model>.json`` with a hash of
everything that defines the run, so a rerun with the same OUT skips finished models. LLMGen reranks
the candidates of the run's best candidate source by ``valid_metric`` (a classic model or the text
retriever, a row of its own) unless ``candidate_source`` is given. Writes ``OUT/benchmark.csv``,
``OUT/benchmark.md`` and ``OUT/benchmark.png``; per-user test metrics go to
``OUT/runs/<model>.users.csv`` for bootstrap intervals and paired differences.

The rooms, one job each:

* :mod:`~recbole_llmgen.benchmark.plan`: which models, each one's config dict, the users evaluated;
* :mod:`~recbole_llmgen.benchmark.inputs`: what a row read, by content (data, weights, versions);
* :mod:`~recbole_llmgen.benchmark.cache`: the run hash and row records (what is reused);
* :mod:`~recbole_llmgen.benchmark.run`: one row, trained and evaluated in its own process;
* :mod:`~recbole_llmgen.benchmark.choose`: LLMGen's candidate source, the rows a run gives;
* :mod:`~recbole_llmgen.benchmark.table`: labels, intervals, paired differences, the markdown table;
* :mod:`~recbole_llmgen.benchmark.plot`: the quality/cost plot and LLMGen's learning curve;
* :mod:`~recbole_llmgen.benchmark.main`: :func:`run_benchmark`, the story that calls them.
"""

from recbole_llmgen.benchmark.cache import run_hash
from recbole_llmgen.benchmark.choose import best_candidate, best_classic, candidate_source_of, expand, row_name
from recbole_llmgen.benchmark.main import run_benchmark, write_outputs
from recbole_llmgen.benchmark.plan import (
    DEFAULT_MODELS,
    DEFAULT_SEED,
    MODEL_DEFAULTS,
    PROTOCOLS,
    TEXT_RETRIEVER,
    file_keys,
    model_config,
    regime_data,
    row_model,
    sample_users,
    split_args,
)
from recbole_llmgen.benchmark.plot import plot, plot_curves
from recbole_llmgen.benchmark.run import (
    error_line,
    keep_struct,
    llm_only_variant,
    named,
    run_in_process,
    run_in_subprocess,
    run_one,
    training_record,
    valid_curve,
)
from recbole_llmgen.benchmark.table import add_intervals, machine_line, markdown_table, row_label

__all__ = [
    "DEFAULT_MODELS", "DEFAULT_SEED", "MODEL_DEFAULTS", "PROTOCOLS", "TEXT_RETRIEVER", "add_intervals",
    "best_candidate", "best_classic", "candidate_source_of", "error_line", "expand", "file_keys", "keep_struct",
    "llm_only_variant", "machine_line", "markdown_table", "model_config", "named", "plot", "plot_curves",
    "regime_data", "row_label", "row_model", "row_name", "run_benchmark", "run_hash", "run_in_process",
    "run_in_subprocess", "run_one", "sample_users", "split_args", "training_record", "valid_curve", "write_outputs",
]  # fmt: skip

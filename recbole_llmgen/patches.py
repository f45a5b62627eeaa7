"""Every RecBole symbol the plugin replaces or wraps, in one list, installed by one :func:`install`.

Each :class:`Patch` names the RecBole symbols it replaces, the module of ours that holds the code,
why, and the test that fails without it. A RecBole release that fixes a defect means deleting its
row and its code. Every replacement goes through :func:`recbole_llmgen.compat.replace`, which
marks it as ours and keeps RecBole's original (``tests/test_patches.py`` checks that each symbol
listed here is ours after :func:`install`, and that each named test exists).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Patch:
    symbols: tuple[str, ...]  # "module:attribute" or "module:Class.attribute"
    where: str  # our module
    why: str
    test: str  # tests/FILE.py::TEST


PATCHES: tuple[Patch, ...] = (
    # --- compat: RecBole 1.2.1 on today's numpy / torch / hyperopt
    Patch((), "compat", "numpy 2 removed np.float_, np.complex_, np.unicode_, np.bool8 (RecBole's Config, ray 2.6.3)",
          "tests/test_compat.py::test_numpy_aliases_restored"),
    Patch((), "compat", "RecBole's metrics read np.float, set only by Config: a process that only unpickles a Config",
          "tests/test_compat.py::test_recbole_metrics_run_in_a_process_that_never_built_a_config"),
    Patch(("recbole.trainer.trainer:Trainer.resume_checkpoint", "recbole.quick_start.quick_start:load_data_and_model",
           "recbole.quick_start:load_data_and_model"), "compat",
          "torch >= 2.6 loads weights only; RecBole's checkpoints pickle the Config: trust exactly the file given",
          "tests/test_compat.py::test_recbole_checkpoint_round_trip_on_new_torch"),
    Patch((), "compat", "sine.py turns on autograd anomaly detection for the whole process at import (~20% of a step)",
          "tests/test_compat.py::test_recbole_sine_import_no_longer_leaves_anomaly_detection_on"),
    Patch(("recbole.trainer.hyper_tuning:np",), "compat",
          "exhaustive search hands hyperopt a RandomState without Generator.integers",
          "tests/test_compat.py::test_recbole_exhaustive_search_runs_on_todays_hyperopt"),
    Patch(("scipy.sparse:dok_matrix._update",), "compat",
          "scipy >= 1.13 removed dok_matrix._update, which LightGCN and RecBole's other graph models call",
          "tests/test_compat.py::test_recbole_lightgcn_builds_its_graph_on_todays_scipy"),
    # --- registry: plugin models by name
    Patch(("recbole.utils:get_model", "recbole.utils.utils:get_model", "recbole.config.configurator:get_model",
           "recbole.quick_start.quick_start:get_model"), "registry",
          "plugin models by name; an unknown name lists the known ones (RecBole says 'No module named lightgbm')",
          "tests/test_registry.py::test_unknown_model_lists_known_names"),
    Patch(("recbole.trainer:LLMGenTrainer",), "registry", "get_trainer finds LLMGenTrainer by name",
          "tests/test_registry.py::test_get_model_and_trainer_by_name"),
    Patch(("recbole.config.configurator:Config._load_internal_config_dict",), "registry",
          "model defaults are read only from RecBole's own properties folder",
          "tests/test_registry.py::test_config_merges_plugin_defaults_under_user_values"),
    Patch(("recbole.config.configurator:Config._set_default_parameters",), "registry",
          "ml-100k is always read from the wheel; LLMGen's item text fields must be loaded (finalize_config)",
          "tests/test_registry.py::test_ml100k_loads_item_text_fields"),
    Patch(("recbole.config.configurator:Config._get_model_and_dataset",), "registry",
          "a config file section named after a model applies to that model only",
          "tests/test_registry.py::test_a_model_section_of_a_config_file_applies_to_that_model_only"),
    Patch(("recbole.utils:get_flops", "recbole.utils.utils:get_flops", "recbole.quick_start.quick_start:get_flops"),
          "registry", "thop would deep-copy and hook a whole LLM; plugin models estimate their own cost",
          "tests/test_patches.py::test_get_flops_asks_a_plugin_model"),
    # --- seen_items: one ranking rule for every model
    Patch(("recbole.data.dataloader.general_dataloader:FullSortEvalDataLoader.collate_fn",), "seen_items",
          "RecBole masks a general model's earlier items in full ranking, never a sequential model's: one rule",
          "tests/test_seen_items.py::test_sequential_masked_metrics_equal_a_computation_by_hand"),
    Patch(("recbole.data.utils:data_preparation", "recbole.data:data_preparation",
           "recbole.quick_start.quick_start:data_preparation"), "seen_items",
          "a sequential model's evaluation rows need the items of the earlier phases to mask them",
          "tests/test_seen_items.py::test_sequential_masked_metrics_equal_a_computation_by_hand"),
    # --- feedback: chat feedback as training interactions (run/benchmark --feedback)
    Patch(("recbole.data.dataset:Dataset.build",), "feedback",
          "the liked items of feedback files join the training split only, never valid or test",
          "tests/test_feedback_training.py::test_likes_join_the_training_split_only"),
    # --- distributed: RecBole's multi-process mode
    Patch(("recbole.config.configurator:Config._init_device",), "distributed",
          "NCCL and cuda:<rank> hard-coded: gloo on CPUs",
          "tests/test_distributed.py::test_two_processes_give_the_one_process_metrics_exactly"),
    Patch(("recbole.data.dataloader.abstract_dataloader:AbstractDataLoader.__init__",
           "recbole.trainer.trainer:Trainer.evaluate"), "distributed",
          "a padding sampler counts users twice and per-rank metrics are averaged: shard batches, gather rows",
          "tests/test_distributed.py::test_two_processes_give_the_one_process_metrics_exactly"),
    Patch(("recbole.trainer.trainer:Trainer.__init__", "recbole.trainer.trainer:Trainer._save_checkpoint"),
          "distributed", "DDP around untrainable models; every rank names and writes its own checkpoint",
          "tests/test_distributed.py::test_training_on_two_ranks_syncs_weights_and_writes_one_agreed_checkpoint"),
    Patch(("recbole.utils.utils:ensure_dir", "recbole.utils:ensure_dir"), "distributed",
          "check-then-create races between ranks (FileExistsError)",
          "tests/test_distributed.py::test_builtin_model_trains_on_two_processes"),
)  # fmt: skip


def install() -> None:
    """Apply every patch above (idempotent). ``import recbole_llmgen`` calls it."""
    from recbole_llmgen import compat

    compat.apply()  # before anything imports RecBole's modules that read numpy's aliases
    from recbole_llmgen import distributed, feedback, registry, seen_items

    distributed.install()
    feedback.install()
    registry.install_hooks()
    seen_items.install()

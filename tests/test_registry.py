import pytest
import yaml

import recbole_llmgen
from recbole_llmgen import registry


def test_get_model_and_trainer_by_name():
    from recbole.utils import get_model, get_trainer
    from recbole.utils.enum_type import ModelType

    assert get_model("LLMGen") is recbole_llmgen.LLMGen
    assert get_trainer(ModelType.SEQUENTIAL, "LLMGen") is recbole_llmgen.LLMGenTrainer
    # the module RecBole's own lookup finds
    import importlib.util

    assert importlib.util.find_spec("recbole.model.sequential_recommender.llmgen") is not None


def test_config_merges_plugin_defaults_under_user_values(toy_root):
    from recbole.config import Config

    config = Config(model="LLMGen", dataset="toy", config_dict={"data_path": str(toy_root), "num_candidates": 7})
    assert config["num_candidates"] == 7  # user value wins
    assert config["score_method"] == "likelihood"  # plugin default
    assert config["candidate_source"] == "pop"
    assert config["eval_args"]["order"] == "TO"  # RecBole's sequential defaults still apply


def test_yaml_file_with_model_llmgen(toy_root, tmp_path):
    from recbole.config import Config

    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump({"model": "LLMGen", "dataset": "toy", "data_path": str(toy_root), "max_history_items": 3})
    )
    config = Config(config_file_list=[str(path)])
    assert config["model"] == "LLMGen" and config["max_history_items"] == 3


def test_ml100k_loads_item_text_fields():
    from recbole.config import Config

    config = Config(model="LLMGen", dataset="ml-100k", config_dict={"state": "ERROR"})
    # the text fields, then every other item field (requests are matched to genres)
    assert config["load_col"]["item"] == ["item_id", "movie_title", "release_year", "class"]
    assert config["load_col"]["inter"] == ["user_id", "item_id", "rating", "timestamp"]
    # other models keep RecBole's own load_col
    sasrec = Config(model="SASRec", dataset="ml-100k", config_dict={"train_neg_sample_args": None})
    assert "item" not in sasrec["load_col"]


def test_ml100k_prefers_a_copy_in_data_path(tmp_path):
    from recbole.config import Config

    assert Config(model="Pop", dataset="ml-100k")["data_path"].endswith("dataset_example/ml-100k")
    local = tmp_path / "mydata" / "ml-100k"
    local.mkdir(parents=True)
    (local / "ml-100k.inter").write_text("user_id:token\titem_id:token\n")
    config = Config(model="Pop", dataset="ml-100k", config_dict={"data_path": str(tmp_path / "mydata")})
    assert config["data_path"] == str(local)


def test_unknown_model_lists_known_names():
    from recbole.config import Config

    with pytest.raises(ValueError, match=r"'SASRek'.*Did you mean SASRec.*Known models:.*LLMGen"):
        Config(model="SASRek", dataset="ml-100k")


def test_duplicate_registration_refused():
    with pytest.raises(ValueError, match="already registered"):
        registry.register_model("LLMGen", recbole_llmgen.LLMGen, "x.yaml")
    with pytest.raises(ValueError, match="built-in"):
        registry.register_model("SASRec", recbole_llmgen.LLMGen, "x.yaml")


def test_a_model_section_of_a_config_file_applies_to_that_model_only(toy_config_dict, tmp_path):
    """`LLMGen: {...}` in a config file reaches LLMGen (at the file layer: a config dict still
    wins) and no other model; the file's top-level keys reach every model."""
    from recbole.config import Config

    path = tmp_path / "scoped.yaml"
    path.write_text(
        "topk: [5]\nLLMGen:\n  epochs: 1\n  num_candidates: 7\n  max_history_items: 3\nBPR:\n  embedding_size: 12\n"
    )
    common = {"data_path": toy_config_dict["data_path"], "state": "ERROR"}
    llm = Config(
        model="LLMGen",
        dataset="toy",
        config_file_list=[str(path)],
        config_dict={**common, "llm_path": toy_config_dict["llm_path"], "max_history_items": 4},
    )
    assert (llm["epochs"], llm["num_candidates"], llm["max_history_items"], llm["topk"]) == (1, 7, 4, [5])
    assert "LLMGen" not in llm.final_config_dict and "BPR" not in llm.final_config_dict
    bpr = Config(model="BPR", dataset="toy", config_file_list=[str(path)], config_dict=common)
    assert bpr["embedding_size"] == 12 and bpr["topk"] == [5] and bpr["epochs"] != 1
    assert bpr["num_candidates"] is None

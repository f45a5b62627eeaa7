import numpy as np
import pytest
import torch

from recbole_llmgen import compat


def test_numpy_aliases_restored():
    compat.restore_numpy_aliases()
    assert np.float_ is np.float64 and np.complex_ is np.complex128 and np.bool8 is np.bool_
    # numpy's own names are left alone
    assert np.bool is np.bool_


def test_recbole_metrics_run_in_a_process_that_never_built_a_config():
    """``load_data_and_model`` then ``evaluate`` builds no Config: RecBole's NDCG reads ``np.float``."""
    import subprocess
    import sys

    code = (
        "import recbole_llmgen, numpy as np\n"
        "from recbole.evaluator.metrics import NDCG\n"
        "hits = np.array([[True, False]]); print(NDCG.metric_info(None, hits, np.array([1]))[0, 1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out) == 1.0


def test_recbole_config_runs_on_numpy_2():
    from recbole.config import Config

    config = Config(model="Pop", dataset="ml-100k", config_dict={"state": "ERROR"})
    assert config["model"] == "Pop"


def test_version_checks_name_the_fix(monkeypatch):
    monkeypatch.setattr(compat, "_version_tuple", lambda p: (3, 0, 0) if p == "pandas" else (70,))
    monkeypatch.setattr(compat.importlib.metadata, "version", lambda p: "3.0.0")
    with pytest.raises(ImportError, match=r"pandas<3"):
        compat.check_versions()
    monkeypatch.setattr(compat, "_version_tuple", lambda p: (2, 3) if p == "pandas" else (81, 0))
    with pytest.raises(ImportError, match=r"setuptools<81"):
        compat.check_versions()


def test_another_recbole_release_is_a_named_error_unless_overridden(monkeypatch):
    versions = {"pandas": (2, 3), "setuptools": (80,), "recbole": (1, 2, 0)}
    monkeypatch.setattr(compat, "_version_tuple", lambda p: versions.get(p, ()))
    monkeypatch.setattr(compat.importlib.metadata, "version", lambda p: "1.2.0")
    monkeypatch.delenv(compat.UNTESTED_RECBOLE_ENV, raising=False)
    with pytest.raises(ImportError, match=r"recbole 1\.2\.0 is installed, .* tested on recbole 1\.2\.1 .*"
                                          r"pip install recbole==1\.2\.1 \(or set RECBOLE_LLMGEN_UNTESTED_RECBOLE=1"):  # fmt: skip
        compat.check_versions()
    monkeypatch.setenv(compat.UNTESTED_RECBOLE_ENV, "1")
    with pytest.warns(UserWarning, match="going on because RECBOLE_LLMGEN_UNTESTED_RECBOLE=1"):
        compat.check_versions()
    versions["recbole"] = (1, 2, 1)  # the tested release: silent
    monkeypatch.delenv(compat.UNTESTED_RECBOLE_ENV)
    compat.check_versions()


class _Opaque:  # not a tensor: refused by torch's weights-only loader
    def __init__(self, value):
        self.value = value


def test_trusted_torch_load_only_inside_the_block(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"config": _Opaque(3)}, path, pickle_protocol=4)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path)
    with compat.trusted_torch_load(str(path)):
        assert torch.load(path)["config"].value == 3
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path)  # the default is restored afterwards


def test_recbole_checkpoint_round_trip_on_new_torch(tmp_path):
    """RecBole's own BPR: train one epoch, save, evaluate the best model, reload it."""
    from recbole.quick_start import load_data_and_model, run_recbole

    result = run_recbole(
        model="BPR",
        dataset="ml-100k",
        config_dict={
            "epochs": 1,
            "show_progress": False,
            "checkpoint_dir": str(tmp_path / "saved"),
            "user_inter_num_interval": "[300,inf)",
            "state": "ERROR",
        },
    )
    assert set(result["test_result"]) >= {"ndcg@10", "hit@10"}
    (saved,) = list((tmp_path / "saved").glob("BPR-*.pth"))
    config, model, *_ = load_data_and_model(str(saved))
    assert type(model).__name__ == "BPR"


def test_recbole_sine_import_no_longer_leaves_anomaly_detection_on():
    import subprocess
    import sys

    probe = "import torch, {module}; print(torch.is_anomaly_enabled())"
    raw = subprocess.run(
        [sys.executable, "-c", probe.format(module="recbole.model.sequential_recommender")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert raw.stdout.strip().splitlines()[-1] == "True"  # RecBole's own behaviour (sine.py)
    fixed = subprocess.run(
        [sys.executable, "-c", probe.format(module="recbole_llmgen, recbole.model.sequential_recommender")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert fixed.stdout.strip().splitlines()[-1] == "False"
    assert not torch.is_anomaly_enabled()


def _exhaustive(tmp_path):
    from recbole.trainer.hyper_tuning import HyperTuning

    params = tmp_path / "hp.txt"
    params.write_text("a choice [1,2,3]\nb choice ['x','y']\n")
    seen = []

    def objective(config_dict, config_file_list):
        seen.append((config_dict["a"], config_dict["b"]))
        result = {"ndcg@10": config_dict["a"] / 10}
        return {"model": "toy", "best_valid_score": config_dict["a"], "valid_score_bigger": True,
                "best_valid_result": result, "test_result": result}  # fmt: skip

    tuner = HyperTuning(objective, params_file=str(params), algo="exhaustive")
    tuner.run()
    return tuner, seen


def test_recbole_exhaustive_search_runs_on_todays_hyperopt(tmp_path, monkeypatch):
    import numpy
    import recbole.trainer.hyper_tuning as hyper_tuning

    tuner, seen = _exhaustive(tmp_path)
    assert sorted(seen) == sorted((a, b) for a in (1, 2, 3) for b in "xy")  # every combination once
    assert tuner.best_params["a"] == 3
    monkeypatch.setattr(hyper_tuning, "np", numpy)  # RecBole's own RandomState: what the fix replaces
    with pytest.raises(AttributeError, match="integers"):
        _exhaustive(tmp_path)


def test_recbole_lightgcn_builds_its_graph_on_todays_scipy(toy_config_dict):
    """LightGCN's adjacency (RecBole's dok_matrix._update, gone from scipy 1.13) holds each
    training interaction twice (user->item, item->user), normalised by both degrees."""
    from conftest import build

    config, model, train_data, *_ = build({**toy_config_dict, "load_col": None, "embedding_size": 8}, model="LightGCN")
    inter = train_data._dataset.inter_feat
    adjacency = model.norm_adj_matrix.coalesce()
    assert adjacency._nnz() == 2 * len(inter)
    users, items = inter["user_id"].numpy(), inter["item_id"].numpy() + model.n_users
    degree = {**{u: (users == u).sum() for u in set(users)}, **{i: (items == i).sum() for i in set(items)}}
    u, i = int(users[0]), int(items[0])
    value = adjacency.to_dense()[u, i].item()
    assert abs(value - 1 / (degree[u] * degree[i]) ** 0.5) < 1e-5

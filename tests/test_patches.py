"""Every RecBole symbol the plugin changes is listed in one place (patches.PATCHES), is ours after
``import recbole_llmgen``, and names a test that exists; the package has no import circle."""

from __future__ import annotations

import ast
import importlib
import os
import re
from pathlib import Path

import pytest
import torch

from recbole_llmgen import compat, patches

PACKAGE = Path(__file__).resolve().parents[1] / "recbole_llmgen"
TESTS = Path(__file__).resolve().parent


def _resolve(symbol: str):
    module_name, attribute = symbol.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda p: p.symbols[0] if p.symbols else p.why[:40])
def test_every_listed_symbol_is_ours_and_its_test_exists(patch):
    for symbol in patch.symbols:
        owner, name = _resolve(symbol)
        current = getattr(owner, name)
        assert getattr(current, "__llmgen_patch__", False) or type(current).__module__.startswith("recbole_llmgen"), (
            f"{symbol} is not the plugin's after install()"
        )
        assert compat.original(owner, name) is not current or name.endswith("Trainer")  # RecBole's own is kept
    file, test = patch.test.split("::")
    tree = ast.parse((TESTS.parent / file).read_text(encoding="utf-8"))
    names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert test in names, f"{patch.test} (named for {patch.why!r}) does not exist"


def test_install_is_idempotent():
    from recbole.trainer import trainer

    before = trainer.Trainer.evaluate
    patches.install()
    assert trainer.Trainer.evaluate is before


def test_get_flops_asks_a_plugin_model(toy_config_dict):
    import logging

    from conftest import build
    from recbole.utils import get_flops

    _, model, train_data, *_ = build(toy_config_dict)
    assert get_flops(model, train_data._dataset, model.device, logging.getLogger(), None) == model.flops_estimate()


class _Opaque:  # not a tensor: refused by torch's weights-only loader
    def __init__(self, value):
        self.value = value


def test_trusted_load_trusts_only_the_file_it_names(tmp_path):
    mine, other = tmp_path / "mine.pth", tmp_path / "other.pth"
    torch.save({"config": _Opaque(1)}, mine, pickle_protocol=4)
    torch.save({"config": _Opaque(2)}, other, pickle_protocol=4)
    with compat.trusted_torch_load(str(mine)):
        assert torch.load(mine)["config"].value == 1
        with pytest.raises(Exception, match="weights_only"):
            torch.load(other)  # another pickle read meanwhile (weights a config names) stays refused


def test_recbole_evaluate_trusts_its_checkpoint_only(toy_config_dict, tmp_path, monkeypatch):
    """Trainer.evaluate reads its own checkpoint; a torch.load of any other pickle during the
    evaluation keeps torch's weights-only default."""
    from conftest import build
    from recbole.trainer import Trainer

    config, model, train_data, valid_data, test_data = build({**toy_config_dict, "model": "BPR"}, model="BPR")
    trainer = Trainer(config, model)
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    other = tmp_path / "other.pth"
    torch.save({"config": _Opaque(2)}, other, pickle_protocol=4)
    refused = []
    full_sort = model.full_sort_predict

    def predict_and_load(interaction):
        try:
            torch.load(other)
        except Exception as error:  # noqa: BLE001
            refused.append("weights_only" in str(error))
        return full_sort(interaction)

    monkeypatch.setattr(model, "full_sort_predict", predict_and_load)
    result = trainer.evaluate(test_data, load_best_model=True)
    assert "ndcg@10" in result and refused and all(refused)


def _imports(path: Path, package: str) -> set[str]:
    """Every recbole_llmgen module ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            found.add(node.module)
            for alias in node.names:  # "from recbole_llmgen import text" imports a module
                if (PACKAGE / f"{alias.name}.py").is_file() or (PACKAGE / alias.name).is_dir():
                    found.add(f"{node.module}.{alias.name}")
    return found


def test_the_package_has_no_import_circle():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    edges = {name: {m for m in _imports(path, "recbole_llmgen") if m in modules and m != name}
             for name, path in modules.items()}  # fmt: skip
    edges["recbole_llmgen"] = set()  # the package's __init__ imports everything; nothing imports it back
    for name in edges:  # a submodule import names its package: that edge is the package's __init__
        edges[name].discard("recbole_llmgen")
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name)


def test_no_module_uses_another_modules_private_names():
    """``module._name`` across modules of the package (its own ``self._x`` is fine)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and (n.module or "").startswith("recbole_llmgen") for a in n.names}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recbole_llmgen"):
                offenders += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_")]  # fmt: skip
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in imported):  # fmt: skip
                offenders.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not offenders, offenders


def test_the_data_path_default_is_defined_once():
    import yaml

    from recbole_llmgen.integration import DEFAULT_DATA_PATH, PROPERTIES

    with open(PROPERTIES, encoding="utf-8") as f:
        assert yaml.safe_load(f)["data_path"] == DEFAULT_DATA_PATH  # the model's yaml says the same
    literal = '"datasets/"'
    users = [p.name for p in PACKAGE.rglob("*.py") if literal in p.read_text(encoding="utf-8")]
    assert users == ["integration.py"], users
    assert os.path.basename(os.path.normpath(DEFAULT_DATA_PATH)) == "datasets"


def test_every_unpickling_load_is_one_named_helper():
    """``weights_only=False`` appears in two places only: RecBole's own load points (compat) and
    integration.load_checkpoint, which the README's Safety section lists with its callers."""
    found = {}
    for root in (PACKAGE, PACKAGE.parent / "benchmarks"):
        for path in root.rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#")[0]
                if re.search(r'(?<!`)weights_only\s*=\s*False|"weights_only", False', code):
                    found.setdefault(path.name, []).append(number)
    assert set(found) == {"compat.py", "integration.py"}, found
    assert len(found["integration.py"]) == 1

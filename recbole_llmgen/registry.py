"""How plugin models (LLMGen) become visible to RecBole 1.2.1 by name.

RecBole finds models, trainers and model defaults by convention, not by a registry:

* ``recbole.utils.get_model(name)`` looks for ``recbole.model.<kind>.<name.lower()>`` with
  ``importlib.util.find_spec``, which consults ``sys.modules`` first. We place a small module
  there whose attribute ``<name>`` is the plugin class.
* ``recbole.utils.get_trainer(type, name)`` tries ``recbole.trainer.<name>Trainer`` first. We set
  that attribute.
* ``Config`` reads model defaults only from its own ``properties/model/<name>.yaml``. We wrap
  ``Config._load_internal_config_dict`` to merge the plugin's yaml at the same layer (after
  RecBole's overall defaults, before the dataset's yaml), so user files, dicts and the command
  line still win.
* A config file may hold settings for one model only: a top-level key named after a model, with
  a mapping (``LLMGen: {epochs: 1, ...}``). We wrap ``Config._get_model_and_dataset`` (the first
  point where the model is known) to merge the section of the model being configured into the
  file layer and drop the others, so one file serves a benchmark of several models.

:func:`register_model` is the one explicit registration call; it refuses a duplicate name.
:func:`install_hooks` wraps the few RecBole functions above once (idempotent).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.machinery
import os
import pkgutil
import sys
import types
from dataclasses import dataclass
from typing import Callable

from recbole_llmgen import feedback, seen_items
from recbole_llmgen.compat import replace

_KIND_PACKAGE = {
    "SEQUENTIAL": "sequential_recommender",
    "GENERAL": "general_recommender",
    "CONTEXT": "context_aware_recommender",
    "KNOWLEDGE": "knowledge_aware_recommender",
}


@dataclass(frozen=True)
class PluginModel:
    name: str
    model_class: type
    yaml_path: str
    trainer_class: type | None = None
    # called with the Config after RecBole has merged every layer (user values included)
    finalize_config: Callable | None = None


_PLUGINS: dict[str, PluginModel] = {}
_hooks_installed = False


def plugin_models() -> dict[str, PluginModel]:
    return dict(_PLUGINS)


def is_plugin_model(name_or_model) -> bool:
    if isinstance(name_or_model, str):
        return name_or_model in _PLUGINS
    return type(name_or_model).__name__ in _PLUGINS and isinstance(
        name_or_model, _PLUGINS[type(name_or_model).__name__].model_class
    )


def register_model(
    name: str,
    model_class: type,
    yaml_path: str,
    trainer_class: type | None = None,
    finalize_config: Callable | None = None,
) -> None:
    """Make ``name`` usable wherever RecBole takes a model name. Refuses a duplicate name."""
    if name in _PLUGINS:
        raise ValueError(f"A plugin model named {name!r} is already registered.")
    if name in builtin_model_names():
        raise ValueError(f"{name!r} is already a RecBole built-in model; choose another name.")
    if not os.path.isfile(yaml_path):
        raise FileNotFoundError(f"Default config of model {name!r} not found: {yaml_path}")
    kind = _KIND_PACKAGE[model_class.type.name]
    module_name = f"recbole.model.{kind}.{name.lower()}"
    module = types.ModuleType(module_name, f"RecBole entry for the plugin model {name}.")
    module.__spec__ = importlib.machinery.ModuleSpec(module_name, loader=None)
    setattr(module, name, model_class)
    sys.modules[module_name] = module
    if trainer_class is not None:
        import recbole.trainer

        replace(recbole.trainer, f"{name}Trainer", trainer_class)
    _PLUGINS[name] = PluginModel(name, model_class, yaml_path, trainer_class, finalize_config)
    install_hooks()


@functools.lru_cache(maxsize=1)
def builtin_model_names() -> tuple[str, ...]:
    """Class names of RecBole's built-in models, read from its model packages."""
    names = []
    for kind in _KIND_PACKAGE.values():
        package = importlib.import_module(f"recbole.model.{kind}")
        for info in pkgutil.iter_modules(package.__path__):
            try:
                module = importlib.import_module(f"recbole.model.{kind}.{info.name}")
            except ImportError:  # optional back-ends (lightgbm, xgboost) not installed
                continue
            for attr, value in vars(module).items():
                if isinstance(value, type) and attr.lower() == info.name:
                    names.append(attr)
    return tuple(sorted(set(names)))


def known_model_names() -> list[str]:
    return sorted(set(builtin_model_names()) | set(_PLUGINS))


def unknown_model_error(name: str) -> ValueError:
    names = known_model_names()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ValueError(
        f"model {name!r} is not a RecBole model nor a registered plugin model.{hint} Known models: {', '.join(names)}"
    )


# --------------------------------------------------------------------------- RecBole hooks


def _get_model_with_names(original):
    @functools.wraps(original)
    def get_model(model_name):
        if isinstance(model_name, str) and model_name in _PLUGINS:
            return _PLUGINS[model_name].model_class
        try:
            return original(model_name)
        except (ValueError, ImportError, ModuleNotFoundError) as error:
            # RecBole 1.2.1 reports an unknown name as "No module named 'lightgbm'" (its
            # exlib package imports optional libraries); say which names exist instead.
            if isinstance(model_name, str) and model_name not in builtin_model_names():
                raise unknown_model_error(model_name) from error
            raise

    get_model._llmgen_hook = True
    return get_model


def _load_internal_config_dict_hook(original):
    @functools.wraps(original)
    def _load_internal_config_dict(self, model, model_class, dataset):
        original(self, model, model_class, dataset)
        plugin = _PLUGINS.get(model)
        if plugin is None:
            return
        # Re-layer: plugin defaults over RecBole's overall ones, then re-apply what RecBole
        # layers over model defaults (the dataset yaml and the sequential quick-start yaml).
        current = os.path.dirname(os.path.realpath(importlib.import_module("recbole.config").__file__))
        properties = os.path.join(current, "..", "properties")
        self._update_internal_config_dict(plugin.yaml_path)
        for path in (
            os.path.join(properties, "dataset", "sample.yaml"),
            os.path.join(properties, "dataset", f"{dataset}.yaml"),
        ):
            if os.path.isfile(path):
                self._update_internal_config_dict(path)
        if model_class.type.name == "SEQUENTIAL":
            self._update_internal_config_dict(os.path.join(properties, "quick_start_config", "sequential.yaml"))

    return _load_internal_config_dict


def model_sections(file_config: dict) -> dict[str, dict]:
    """The per-model sections of a config file layer: top-level keys naming a model, with a mapping."""
    mappings = [k for k, v in file_config.items() if isinstance(v, dict)]
    if not mappings:
        return {}
    names = set(known_model_names())
    return {k: file_config[k] for k in mappings if k in names}


def _get_model_and_dataset_hook(original):
    @functools.wraps(original)
    def _get_model_and_dataset(self, model, dataset):
        result = original(self, model, dataset)
        sections = model_sections(self.file_config_dict or {})
        if sections:
            files = {k: v for k, v in self.file_config_dict.items() if k not in sections}
            self.file_config_dict = {**files, **sections.get(result[0], {})}
            self._merge_external_config_dict()  # file < config_dict < command line, as before
        return result

    return _get_model_and_dataset


def _set_default_parameters_hook(original):
    @functools.wraps(original)
    def _set_default_parameters(self):
        data_root = self.final_config_dict.get("data_path")
        original(self)
        # RecBole always reads ml-100k from its wheel; prefer a copy in the user's data_path.
        if self.dataset == "ml-100k" and data_root:
            local = os.path.join(data_root, self.dataset)
            if os.path.isfile(os.path.join(local, f"{self.dataset}.inter")):
                self.final_config_dict["data_path"] = local
        # one ranking rule for every model (recbole_llmgen.seen_items), checked before any data is read
        self.final_config_dict["seen_items"] = seen_items.check(self.final_config_dict.get("seen_items"))
        # feedback files whose likes join the training split (recbole_llmgen.feedback)
        self.final_config_dict[feedback.KEY] = feedback.check_config(self.final_config_dict.get(feedback.KEY))
        plugin = _PLUGINS.get(self.model)
        if plugin is not None and plugin.finalize_config is not None:
            plugin.finalize_config(self)

    return _set_default_parameters


def _get_flops_hook(original):
    @functools.wraps(original)
    def get_flops(model, dataset, device, logger, transform, verbose=False):
        # thop would deep-copy and hook a whole LLM; plugin models estimate their own cost.
        if type(model).__name__ in _PLUGINS:
            return model.flops_estimate()
        return original(model, dataset, device, logger, transform, verbose)

    return get_flops


def install_hooks() -> None:
    """Wrap RecBole's lookup points once. Idempotent."""
    global _hooks_installed
    if _hooks_installed:
        return
    import recbole.config.configurator as configurator
    import recbole.quick_start.quick_start as quick_start
    import recbole.utils
    import recbole.utils.utils as utils

    get_model = _get_model_with_names(utils.get_model)
    for module in (utils, recbole.utils, configurator, quick_start):
        replace(module, "get_model", get_model)
    get_flops = _get_flops_hook(utils.get_flops)
    for module in (recbole.utils, utils, quick_start):
        replace(module, "get_flops", get_flops)
    Config = configurator.Config
    replace(Config, "_load_internal_config_dict", _load_internal_config_dict_hook(Config._load_internal_config_dict))
    replace(Config, "_set_default_parameters", _set_default_parameters_hook(Config._set_default_parameters))
    replace(Config, "_get_model_and_dataset", _get_model_and_dataset_hook(Config._get_model_and_dataset))
    _hooks_installed = True

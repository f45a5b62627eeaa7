"""RecBole 1.2.1 on today's numpy / pandas / torch / ray, in one place.

RecBole's last release predates numpy 2, pandas 3, torch 2.6 and setuptools 81. Everything the
plugin needs to make it run sits here and is applied once by :func:`apply` (called from
``recbole_llmgen/__init__.py`` before RecBole is imported):

* numpy 2 removed aliases (``np.float_``, ``np.complex_``, ``np.unicode_``, ``np.bool8``) that
  ``Config.compatibility_settings`` and ray 2.6.3 read: we restore the missing ones only.
* RecBole's metrics read ``np.float`` (and its Config sets ``np.int``, ``np.float``... on every
  construction): set once at import too, for processes that only unpickle a Config.
* pandas 3 changes string and copy-on-write semantics RecBole relies on: pinned ``pandas<3``,
  checked here with a clear message.
* ray 2.6.3 (imported by ``recbole.quick_start``) imports ``pkg_resources``, removed in
  setuptools 81: pinned ``setuptools<81``, checked here.
* torch >= 2.6 loads with ``weights_only=True``, which cannot read RecBole's pickled checkpoints
  (they hold the whole ``Config``). :func:`trusted_torch_load` allows a full unpickle of exactly the
  file RecBole's own load points are given (``Trainer.evaluate``'s checkpoint, ``resume_checkpoint``'s
  file, ``load_data_and_model``'s model file): a checkpoint this run wrote or a file the user named.
  Any other ``torch.load`` meanwhile (model weights a config names) keeps torch's safe default.
* ``recbole/model/sequential_recommender/sine.py`` calls ``torch.autograd.set_detect_anomaly(True)``
  at import, so importing any RecBole sequential model turns anomaly detection on for the whole
  process: every backward pass then checks every gradient for NaN (measured: ~20% of a LoRA
  step on CPU). :func:`undo_global_anomaly_detection` imports that package and switches it back
  off; a user who wants it sets it after importing recbole_llmgen.
* RecBole's exhaustive hyper-parameter search (``HyperTuning(algo="exhaustive")``) hands hyperopt a
  ``numpy.random.RandomState``; hyperopt >= 0.2.7 samples ``hp.choice`` with the Generator method
  ``rng.integers``, which RandomState lacks (``AttributeError: ... 'integers'``).
  :func:`patch_exhaustive_search` gives that one module a RandomState that also has ``integers``
  (the same draws as ``randint``, so a seed gives the same trials).
* scipy >= 1.13 removed ``dok_matrix._update`` (a dict update without checks), which the graph
  models build their adjacency matrix with (LightGCN, NGCF, SpectralCF, GCMC, NCL, KGIN, MCCLK:
  ``AttributeError: 'dok_matrix' object has no attribute '_update'``). :func:`patch_dok_update`
  gives it back as scipy's public, checked ``update`` (the same entries).
* RecBole's multi-process mode (``nproc``, ``world_size``) is NCCL-only, double-counts users and
  averages per-rank metrics, wraps untrainable models in DDP and races on file names and folders:
  :func:`recbole_llmgen.distributed.install` replaces those pieces; a single-process run still
  takes RecBole's own code path.

Every RecBole symbol the plugin replaces goes through :func:`replace` (marked as ours, RecBole's
original kept); :mod:`recbole_llmgen.patches` lists them all with the test that fails without each.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import os
import warnings
from collections.abc import Iterator

import numpy as np

# numpy 2 removed these; RecBole's Config and ray 2.6.3 still read them.
_NUMPY_ALIASES = {
    "float_": np.float64,
    "complex_": np.complex128,
    "unicode_": np.str_,
    "string_": np.bytes_,
    "bool8": np.bool_,
}

_applied = False
ORIGINALS: dict[tuple[int, str], object] = {}  # (id of the owner, name) -> RecBole's own object


def replace(owner, name: str, new) -> None:
    """Set ``owner.name`` to ``new`` (the plugin's version of a RecBole symbol), marked as ours and
    with RecBole's original kept in :data:`ORIGINALS`. Replacing again keeps the first original."""
    ORIGINALS.setdefault((id(owner), name), getattr(owner, name, None))
    try:
        new.__llmgen_patch__ = True
    except (AttributeError, TypeError):  # objects that take no attributes are recognised by type
        pass
    setattr(owner, name, new)


def original(owner, name: str):
    """RecBole's own ``owner.name`` before the plugin replaced it (the current one when it did not)."""
    return ORIGINALS.get((id(owner), name), getattr(owner, name))


def _version_tuple(package: str) -> tuple[int, ...]:
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ()
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


TESTED_RECBOLE = (1, 2, 1)  # the release every patch was written against
UNTESTED_RECBOLE_ENV = "RECBOLE_LLMGEN_UNTESTED_RECBOLE"  # =1: import on another release, with a warning


def check_versions() -> None:
    """Fail early, with the fix, on package versions RecBole 1.2.1 cannot run with."""
    pandas = _version_tuple("pandas")
    if pandas and pandas >= (3,):
        raise ImportError(
            f"pandas {importlib.metadata.version('pandas')} is installed, but RecBole 1.2.1 "
            "needs pandas<3. Run: pip install 'pandas<3'"
        )
    setuptools = _version_tuple("setuptools")
    if setuptools and setuptools >= (81,):
        raise ImportError(
            f"setuptools {importlib.metadata.version('setuptools')} is installed, but "
            "recbole.quick_start imports ray 2.6.3, which needs pkg_resources (removed in "
            "setuptools 81). Run: pip install 'setuptools<81'"
        )
    recbole = _version_tuple("recbole")
    if recbole and recbole != TESTED_RECBOLE:
        found, tested = importlib.metadata.version("recbole"), ".".join(map(str, TESTED_RECBOLE))
        text = (
            f"recbole {found} is installed, but recbole-llmgen is tested on recbole {tested} only: its patches "
            f"(recbole_llmgen/patches.py) replace RecBole internals of that release. Run: pip install recbole=={tested}"
        )
        if os.environ.get(UNTESTED_RECBOLE_ENV) != "1":
            raise ImportError(f"{text} (or set {UNTESTED_RECBOLE_ENV}=1 to try anyway)")
        warnings.warn(f"{text}; going on because {UNTESTED_RECBOLE_ENV}=1", stacklevel=2)


def restore_numpy_aliases() -> list[str]:
    """Add back the numpy aliases removed in numpy 2 that RecBole/ray use; returns those added."""
    added = []
    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)
            added.append(name)
    return added


def set_recbole_numpy_aliases() -> None:
    """The aliases RecBole's metrics use (``np.float`` in NDCG/MAP...), set as its own ``Config``
    sets them on every construction. A process that never builds a Config (``load_data_and_model``
    unpickles one, then ``Trainer.evaluate``) would otherwise fail in the evaluator."""
    from recbole.config import Config

    Config.compatibility_settings(None)  # it does not use self


@contextlib.contextmanager
def trusted_torch_load(*paths) -> Iterator[None]:
    """Within this block ``torch.load`` of one of ``paths`` defaults to ``weights_only=False``;
    every other file keeps torch's safe default.

    RecBole checkpoints pickle the whole Config (and use pickle protocol 4, which the
    weights-only unpickler rejects), so they cannot be read any other way. Unpickling runs code
    from the file: name only a file this run wrote or the user named.
    """
    import torch

    original_load = torch.load
    trusted = {os.path.realpath(os.fspath(p)) for p in paths if p is not None}

    @functools.wraps(original_load)
    def load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.path.realpath(os.fspath(f)) in trusted:
            kwargs.setdefault("weights_only", False)
        return original_load(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original_load


def _trusting(function, checkpoint_of):
    """``function`` with ``torch.load`` trusting only the checkpoint ``checkpoint_of(arguments)`` names."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with trusted_torch_load(checkpoint_of(bound.arguments)):
            return function(*args, **kwargs)

    return wrapper


def _evaluated_checkpoint(arguments):
    if not arguments.get("load_best_model"):
        return None
    return arguments.get("model_file") or getattr(arguments["self"], "saved_model_file", None)


def patch_checkpoint_loading() -> None:
    """Let RecBole's own load points read the RecBole checkpoint they are given on torch >= 2.6."""
    with warnings.catch_warnings():  # ray 2.6.3 imports pkg_resources: deprecated, and pinned (setuptools<81)
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        import recbole.quick_start
        import recbole.quick_start.quick_start as qs
    from recbole.trainer import trainer

    replace(trainer.Trainer, "evaluate", _trusting(trainer.Trainer.evaluate, _evaluated_checkpoint))
    replace(trainer.Trainer, "resume_checkpoint",
            _trusting(trainer.Trainer.resume_checkpoint, lambda a: a["resume_file"]))  # fmt: skip
    loader = _trusting(qs.load_data_and_model, lambda a: a["model_file"])
    replace(qs, "load_data_and_model", loader)
    replace(recbole.quick_start, "load_data_and_model", loader)


def undo_global_anomaly_detection() -> None:
    """Import RecBole's sequential models (SINE's import enables anomaly mode) and disable it."""
    import recbole.model.sequential_recommender  # noqa: F401
    import torch

    torch.autograd.set_detect_anomaly(False)


class _RandomState(np.random.RandomState):
    """A RandomState with the Generator method hyperopt's samplers call."""

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        if high is None:
            low, high = 0, low
        return self.randint(low, high + 1 if endpoint else high, size=size, dtype=dtype)


class _NumpyWithIntegers:
    """numpy as ``recbole.trainer.hyper_tuning`` sees it: every attribute numpy's, except
    ``random.RandomState``."""

    def __init__(self):
        import types

        self.random = types.SimpleNamespace(
            **{k: getattr(np.random, k) for k in dir(np.random) if not k.startswith("__")}
        )
        self.random.RandomState = _RandomState

    def __getattr__(self, name):
        return getattr(np, name)


def patch_exhaustive_search() -> None:
    """RecBole's exhaustive search on today's hyperopt (see the module docstring)."""
    import recbole.trainer.hyper_tuning as hyper_tuning

    if not isinstance(hyper_tuning.np, _NumpyWithIntegers):
        replace(hyper_tuning, "np", _NumpyWithIntegers())


def patch_dok_update() -> None:
    """``dok_matrix._update`` for RecBole's graph models on today's scipy (see the module docstring)."""
    import scipy.sparse as sp

    if not hasattr(sp.dok_matrix, "_update"):  # scipy < 1.13 still has its own
        replace(sp.dok_matrix, "_update", _dok_update)


def _dok_update(self, data: dict) -> None:
    self.update(data)


def apply() -> None:
    """Apply every fix above once. Idempotent."""
    global _applied
    if _applied:
        return
    check_versions()
    restore_numpy_aliases()
    set_recbole_numpy_aliases()
    patch_checkpoint_loading()
    undo_global_anomaly_detection()
    patch_exhaustive_search()
    patch_dok_update()
    _applied = True

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
  (they hold the whole ``Config``). :func:`trusted_torch_load` allows a full unpickle only inside
  RecBole's own load points: a checkpoint this run wrote or a file the user named.
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
* RecBole's multi-process mode (``nproc``, ``world_size``) is NCCL-only, double-counts users and
  averages per-rank metrics, wraps untrainable models in DDP and races on file names and folders:
  :func:`recbole_llmgen.distributed.install` (called by :func:`apply`) replaces those pieces; a
  single-process run still takes RecBole's own code path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
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
def trusted_torch_load() -> Iterator[None]:
    """Within this block ``torch.load`` defaults to ``weights_only=False``.

    RecBole checkpoints pickle the whole Config (and use pickle protocol 4, which the
    weights-only unpickler rejects), so they cannot be read any other way. Unpickling runs code
    from the file: use this only for a file this run wrote or the user named.
    """
    import torch

    original = torch.load

    @functools.wraps(original)
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _with_trusted_load(function):
    if getattr(function, "_llmgen_trusted_load", False):
        return function

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with trusted_torch_load():
            return function(*args, **kwargs)

    wrapper._llmgen_trusted_load = True
    return wrapper


def patch_checkpoint_loading() -> None:
    """Let RecBole's own load points read RecBole checkpoints on torch >= 2.6."""
    import recbole.quick_start
    import recbole.quick_start.quick_start as qs
    from recbole.trainer import trainer

    trainer.Trainer.evaluate = _with_trusted_load(trainer.Trainer.evaluate)
    trainer.Trainer.resume_checkpoint = _with_trusted_load(trainer.Trainer.resume_checkpoint)
    wrapped = _with_trusted_load(qs.load_data_and_model)
    qs.load_data_and_model = wrapped
    recbole.quick_start.load_data_and_model = wrapped


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
        hyper_tuning.np = _NumpyWithIntegers()


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
    from recbole_llmgen import distributed

    distributed.install()
    _applied = True

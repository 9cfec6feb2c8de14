"""`serve()`: load a model, build the app, run uvicorn; and the `serve` command line (vLLM's option names)."""

from __future__ import annotations

import argparse
import os
import re

from hf_paged.blocks import DEFAULT_BLOCK_SIZE

UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_bytes(text: str) -> int:
    """'268435456', '256MiB', '2GiB', '1.5GB' -> bytes (a trailing 'B' is optional)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?)?b?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 268435456, 256MiB, 2GiB)")
    value = float(match.group(1)) * UNITS[(match.group(2) or "").lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be at least 1 byte, got {text!r}")
    return int(value)


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_queue: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    log_level: str = "info",
    tensor_parallel_size: int = 1,
    **engine_kwargs,
) -> None:
    """Serve a local model (None: the embedded SmolLM2-135M-Instruct) with the OpenAI API until interrupted.

    Args:
        model: a model directory, a .gguf file, or None / "default" for the embedded default.
        host, port: where to listen (loopback by default; expose it knowingly).
        api_key: require `Authorization: Bearer <api_key>` on every route but /health.
        served_model_name: the name clients pass as `model` (default: `model` as given, or the default's name).
        max_queue: generation requests in flight at most; more are answered 429 (default: 4 x max_num_seqs).
        dtype, device: passed to `hf_paged.models.load_model`.
        log_level: uvicorn's log level.
        tensor_parallel_size: > 1 shards the model with transformers' tensor parallelism over that many processes,
            which must be started by torchrun (`torchrun --nproc_per_node N $(which hf-paged) serve ...`); rank 0
            serves HTTP, the other ranks follow its steps.
        **engine_kwargs: `hf_paged.LLM`'s engine options (block_size, kv_cache_memory, num_blocks, max_num_seqs,
            max_num_batched_tokens, max_model_len, enable_prefix_caching, enforce_eager, compile_model).
    """
    require_server_extras()
    import uvicorn

    from hf_paged.engine.llm import LLM
    from hf_paged.models import DEFAULT_ALIASES, DEFAULT_MODEL, load_model
    from hf_paged.server.app import build_app

    sync = None
    if tensor_parallel_size > 1:
        from hf_paged.engine.tp import StepSync, init_tensor_parallel

        init_tensor_parallel(tensor_parallel_size)
        loaded, tokenizer = load_model(model, dtype=dtype, tp_plan="auto")
        llm = LLM(loaded, tokenizer, **_server_batch_defaults(loaded, engine_kwargs))
        sync = StepSync(llm.engine)
        if sync.rank > 0:
            sync.follow()
            return
    else:
        loaded, tokenizer = load_model(model, dtype=dtype, device=device)
        llm = LLM(loaded, tokenizer, **_server_batch_defaults(loaded, engine_kwargs))
    name = served_model_name or (DEFAULT_MODEL if model is None or model in DEFAULT_ALIASES else str(model))
    app = build_app(llm.engine, name, api_key=api_key, max_queue=max_queue, step_sync=sync)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        if sync is not None:
            sync.shutdown()


SERVER_EXTRAS = ("fastapi", "uvicorn", "prometheus_client")


class ServerExtrasMissing(ImportError):
    """fastapi, uvicorn or prometheus-client is not installed (the `server` extra); the message says what to run."""


def require_server_extras() -> None:
    """ServerExtrasMissing, naming the missing packages, when the `server` extra is not installed: checked before
    a model loads."""
    import importlib.util

    missing = [name for name in SERVER_EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        raise ServerExtrasMissing(f"the server needs {', '.join(missing)} (the 'server' extra): "
                                  "pip install 'hf_paged[server]'")


def _server_batch_defaults(model, engine_kwargs: dict) -> dict:
    """max_num_seqs / max_num_batched_tokens left unset (None) take vLLM's server defaults for this device."""
    from hf_paged.engine.llm import batch_defaults

    seqs, tokens = batch_defaults(model, server=True)
    kwargs = dict(engine_kwargs)
    if kwargs.get("max_num_seqs") is None:
        kwargs["max_num_seqs"] = seqs
    if kwargs.get("max_num_batched_tokens") is None:
        kwargs["max_num_batched_tokens"] = tokens
    return kwargs


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `hf-paged serve` / `python -m hf_paged.server` (named as vLLM's `vllm serve`)."""
    parser.add_argument("model", nargs="?", default=None,
                        help="a local model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("HF_PAGED_API_KEY"),
                        help="require 'Authorization: Bearer <key>' on every route but /health "
                             "(default: $HF_PAGED_API_KEY, else none)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the model argument as given)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="generation requests in flight at most; more get HTTP 429 (default: 4 x max-num-seqs)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV block (default: %(default)s)")
    engine.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                        help="bytes for the KV pool, e.g. 2GiB (default: 90%% of free GPU memory; 256MiB on CPU)")
    engine.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks (overrides the above)")
    engine.add_argument("--max-num-seqs", type=int, default=None,
                        help="sequences running at once (default: 1024 on a GPU of 70 GiB or more but an A100, else 256)")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per engine step; longer prompts are prefilled in chunks (default: 8192)")
    engine.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output (default: the model's max_position_embeddings)")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="share the KV blocks of common prompt prefixes (default: on)")
    engine.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                        help="model dtype (default: the checkpoint's; GGUF loads as float32)")
    engine.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where the model loads)")
    engine.add_argument("--enforce-eager", action="store_true",
                        help="run every forward eagerly: no CUDA graphs, no torch.compile (default: both on a GPU)")
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="shard the model over N processes with transformers' tensor parallelism; start them "
                             "with torchrun --nproc_per_node N (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (default: %(default)s)")
    return parser


def run_serve(args: argparse.Namespace) -> None:
    """Run `serve()` with parsed `add_serve_args` options."""
    serve(
        args.model, host=args.host, port=args.port, api_key=args.api_key, served_model_name=args.served_model_name,
        max_queue=args.max_queue, dtype=args.dtype, device=args.device, log_level=args.log_level,
        block_size=args.block_size, kv_cache_memory=args.kv_cache_memory, num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
    )

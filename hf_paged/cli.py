"""`hf-paged`: generate with paged KV memory from the command line, and run hf_paged's benchmarks.

    hf-paged generate "What is the capital of France?"
    hf-paged bench kernels --tiny
    hf-paged bench throughput --model tiny --num-requests 8
    hf-paged serve --port 8000
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import BatchEncoding

import hf_paged
from hf_paged.blocks import DEFAULT_BLOCK_SIZE
from hf_paged.models import DEFAULT_MODEL, DTYPES, load_model

PROG = "hf-paged"
GENERATE_EXAMPLES = """\
examples:
  hf-paged generate "What is the capital of France?"
  hf-paged generate --temperature 0.8 --top-p 0.95 --seed 0 "Write a haiku about memory."
  hf-paged generate --file prompts.txt --json > outputs.json
  echo "Tell me a joke." | hf-paged generate --stream
  hf-paged generate --model ./my-llama --no-chat "The sky is"
"""


class UsageError(ValueError):
    """A mistake in the command line or its input; reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line to stderr (exit status 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text for one or more prompts with paged KV memory",
        description=(
            'Generate text for one or more prompts with model.generate(cache_implementation="paged").\n'
            "Prompts come from the arguments, then --file (one per line), or from stdin (one per line) when\n"
            "neither is given. All prompts run as one left-padded batch; only the generated text is printed."
        ),
        epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=_generate, parser=parser)
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (quote it); several run as a batch")
    parser.add_argument("--file", type=Path, metavar="PATH",
                        help="read prompts from PATH, one per line (blank lines skipped; '-' reads stdin)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME_OR_PATH",
                       help=f"'{DEFAULT_MODEL}' (embedded GGUF), a local model directory or a .gguf file "
                            "(default: %(default)s)")
    model.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="weights and activations dtype; auto keeps the checkpoint's (default: %(default)s)")
    model.add_argument("--device", default=None,
                       help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N",
                          help="tokens to generate per prompt at most (default: %(default)s)")
    sampling.add_argument("--temperature", type=_non_negative_float, default=0.0, metavar="T",
                          help="sampling temperature; 0 is greedy decoding (default: %(default)s)")
    sampling.add_argument("--top-p", type=_probability, default=None, metavar="P",
                          help="nucleus sampling: keep the smallest token set of probability >= P (default: off)")
    sampling.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                          help="sample among the K most likely tokens only (default: off)")
    sampling.add_argument("--seed", type=lambda text: _number(text, int), default=None, help="random seed for sampling (default: none)")
    sampling.add_argument("--num-beams", type=_positive_int, default=1, metavar="N",
                          help="beam search with N beams; beams share KV blocks (default: %(default)s)")

    prompt = parser.add_argument_group("prompt format")
    prompt.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap each prompt as a user message with the tokenizer's chat template "
                             "(default: on when the tokenizer has a chat template)")
    prompt.add_argument("--system", default=None, metavar="TEXT", help="system prompt (chat mode only)")

    cache = parser.add_argument_group("paged KV cache")
    cache.add_argument("--block-size", type=_positive_int, default=DEFAULT_BLOCK_SIZE, metavar="N",
                       help="tokens per KV block (default: %(default)s)")

    output = parser.add_argument_group("output")
    output.add_argument("--stream", action="store_true",
                        help="print tokens as they are generated (one prompt only)")
    output.add_argument("--json", action="store_true", help='print a JSON list of {"prompt", "output"} objects')


def _add_bench_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks", description="hf_paged benchmarks.")
    benches = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    # NOTE: the kernels benchmark parses its own options: main() hands it everything after "bench kernels".
    helps = {
        "kernels": "time the paged kernels against sdpa (run with --help for options)",
        "throughput": "HF generate vs HF continuous batching vs hf_paged, one workload (--help for options)",
        "memory": "KV bytes of beam search and parallel sampling vs DynamicCache (--help for options)",
        "steps": "where an engine decode step's time goes: wall, kernels, host (--help for options)",
        "host": "the engine's host work per decode step, the model forward taken out (--help for options)",
        "diff": "two runs of one benchmark (JSON) side by side, row by row: A/B runs of a switch",
    }
    for name, text in helps.items():
        bench = benches.add_parser(name, add_help=False, help=text)
        bench.set_defaults(handler=_bench, parser=bench, bench_module=f"hf_paged.bench.{name}")


def _add_serve_parser(subparsers) -> None:
    from hf_paged.server import add_serve_args

    parser = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible server",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /health, /metrics) on the continuous-batching engine.",
    )
    add_serve_args(parser)
    parser.set_defaults(handler=_serve, parser=parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="PagedAttention KV memory for stock Hugging Face Transformers models."
    )
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {hf_paged.__version__} (transformers {transformers.__version__}, "
                                f"torch {torch.__version__})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate_parser(subparsers)
    _add_bench_parser(subparsers)
    _add_serve_parser(subparsers)
    return parser


# ------------------------------------------------------------------------------------------------ generate
def read_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from the arguments, then --file; from stdin when neither is given and stdin is not a terminal."""
    prompts = list(args.prompts)
    for i, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            raise UsageError(f"prompt {i} is empty")
    if args.file is not None:
        prompts += _read_lines(args.file)
    elif not prompts:
        if sys.stdin.isatty():
            raise UsageError("no prompt: give PROMPT arguments, --file PATH, or pipe prompts on stdin")
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
        if not prompts:
            raise UsageError("no prompt: stdin was empty")
    return prompts


def _read_lines(path: Path) -> list[str]:
    if str(path) == "-":
        text, name = sys.stdin.read(), "stdin"
    else:
        try:
            text, name = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read --file {path}: {err}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"--file {name} holds no prompt")
    return lines


def _check_options(args: argparse.Namespace, num_prompts: int) -> None:
    if args.stream and num_prompts > 1:
        raise UsageError(f"--stream takes one prompt, got {num_prompts}")
    if args.stream and args.num_beams > 1:
        raise UsageError("--stream cannot be combined with --num-beams > 1 (beams are only final at the end)")
    if args.stream and args.json:
        raise UsageError("--stream and --json cannot be combined")
    if args.temperature == 0 and (args.top_p is not None or args.top_k is not None):
        raise UsageError("--top-p / --top-k apply to sampling only: add --temperature > 0")
    if args.system is not None and args.chat is False:
        raise UsageError("--system needs chat mode (drop --no-chat)")


def _use_chat(args: argparse.Namespace, tokenizer) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.chat and not has_template:
        raise UsageError(f"--chat: the tokenizer of {args.model} has no chat template; use --no-chat")
    chat = has_template if args.chat is None else args.chat
    if args.system is not None and not chat:
        raise UsageError(f"--system needs chat mode, and the tokenizer of {args.model} has no chat template")
    return chat


def build_inputs(tokenizer, prompts: list[str], chat: bool, system: str | None) -> BatchEncoding:
    """One left-padded batch: input_ids and attention_mask [B, L]."""
    if chat:
        texts = []
        for prompt in prompts:
            messages = ([{"role": "system", "content": system}] if system is not None else [])
            messages.append({"role": "user", "content": prompt})
            texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        # The template already holds the special tokens (BOS included where the model wants one).
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return tokenizer(prompts, return_tensors="pt", padding=True)


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": args.temperature > 0}
    if kwargs["do_sample"]:
        kwargs["temperature"] = args.temperature
        if args.top_p is not None:
            kwargs["top_p"] = args.top_p
        if args.top_k is not None:
            kwargs["top_k"] = args.top_k
    return kwargs


def _generate(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    prompts = read_prompts(args)
    _check_options(args, len(prompts))
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    except ValueError as err:  # ModelNotFoundError / ModelLoadError, or a bad --device
        raise UsageError(str(err)) from None
    chat = _use_chat(args, tokenizer)
    inputs = build_inputs(tokenizer, prompts, chat, args.system).to(model.device)
    streamer = None
    if args.stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    output_ids = model.generate(
        **inputs,
        **_sampling_kwargs(args),
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        cache_implementation="paged",
        cache_config={"block_size": args.block_size},
    )  # (B, L + new)
    if streamer is not None:
        return 0  # the streamer has printed the text and a final newline
    outputs = tokenizer.batch_decode(output_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    _print_outputs(prompts, outputs, as_json=args.json)
    return 0


def _print_outputs(prompts: list[str], outputs: list[str], as_json: bool) -> None:
    if as_json:
        records = [{"prompt": p, "output": o} for p, o in zip(prompts, outputs)]
        print(json.dumps(records, ensure_ascii=False, indent=2))
        return
    if len(outputs) == 1:
        print(outputs[0])
        return
    for i, (prompt, output) in enumerate(zip(prompts, outputs), 1):
        if i > 1:
            print()
        print(f"=== [{i}/{len(outputs)}] {_one_line(prompt)}")
        print(output)


def _one_line(text: str, width: int = 72) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


# ------------------------------------------------------------------------------------------------ bench
def _bench(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        bench = importlib.import_module(args.bench_module)
    except ModuleNotFoundError as err:
        if not args.bench_module.startswith(err.name or "\0"):
            raise
        raise UsageError(f"the benchmark {args.bench_module} is not part of this installation") from None
    return bench.main(extra) or 0


def _serve(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    from hf_paged.server.launch import ServerExtrasMissing, run_serve

    try:
        run_serve(args)
    except ServerExtrasMissing as err:
        print(f"{args.parser.prog}: error: {err}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    """Run `hf-paged` with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    # parse_known_args: `bench kernels` hands its options to the benchmark's own parser.
    args, extra = parser.parse_known_args(argv)
    try:
        return args.handler(args, extra)
    except UsageError as err:
        print(f"{args.parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

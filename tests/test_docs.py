"""docs/supported.md is generated from the test matrix; this test fails when the two drift apart.

Regenerate with: HF_PAGED_UPDATE_DOCS=1 pytest tests/test_docs.py
"""

import ast
import os
from pathlib import Path

from tests.tiny import CONFIGS, FEATURES

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "supported.md"

# test file -> what its tests establish against a reference
SOURCES = {
    "tests/hf/test_generate_modes.py": "generate(cache_implementation='paged') vs DynamicCache (tiny Llama, CPU)",
    "tests/engine/test_engine.py": "hf_paged.LLM engine vs per-prompt HF generate",
    "tests/integrations/test_peft_bnb.py": "PEFT and bitsandbytes, paged generate and the engine vs DynamicCache",
    "tests/integrations/test_pipeline.py": "pipeline('text-generation') with cache_implementation='paged'",
    "tests/distributed/test_tp_cpu.py": "tensor parallelism, 2 gloo ranks vs one process",
    "tests/hf/test_cuda.py": "on the GPU (H100): Triton kernels vs DynamicCache + sdpa",
}


def _tests(path: str) -> list[str]:
    tree = ast.parse((REPO / path).read_text())
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]


def render() -> str:
    lines = [
        "# Supported models and options",
        "",
        "Generated from the test matrix by `tests/test_docs.py`; every row is a test comparing against a reference",
        "(the default DynamicCache or HF generate). Do not edit by hand.",
        "",
        "## Architectures (tiny random models from configs, greedy ragged batches, tokens and scores)",
        "",
        "| architecture | config | tested by |",
        "|---|---|---|",
    ]
    for arch in sorted(CONFIGS):
        config = CONFIGS[arch]()
        notes = []
        if getattr(config, "sliding_window", None):
            notes.append(f"sliding window {config.sliding_window}")
        if getattr(config, "attn_logit_softcapping", None):
            notes.append(f"soft-capping {config.attn_logit_softcapping}")
        if arch in FEATURES:
            notes.append(FEATURES[arch])
        heads = config.num_attention_heads
        try:
            kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
        except RuntimeError:  # set per layer (Gemma4): the global attribute refuses to answer (AmbiguousGlobal...)
            kv = "/".join(str(n) for n in sorted({c.num_key_value_heads for c in config.per_layer_config}))
        notes.append(f"{heads} q / {kv} kv heads")
        lines.append(f"| {arch} | {type(config).__name__}: {', '.join(notes)} | "
                     f"tests/hf/test_architectures.py |")
    lines.append("| SmolLM2-135M-Instruct (real weights, GGUF) | LlamaConfig | tests/test_cli.py, "
                 "tests/test_examples.py |")
    for path, what in SOURCES.items():
        lines += ["", f"## {what}", "", f"`{path}`:", ""]
        lines += [f"- {name[5:].replace('_', ' ')}" for name in _tests(path)]
    return "\n".join(lines) + "\n"


def test_supported_table_matches_the_tests():
    text = render()
    if os.environ.get("HF_PAGED_UPDATE_DOCS"):
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/supported.md is stale: HF_PAGED_UPDATE_DOCS=1 pytest tests/test_docs.py"

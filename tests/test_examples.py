"""CI runs every example: the embedded-default ones in-process (one model load), the server one against a live
loopback server on a tiny model. Each checks its own output against what it must print."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name, capsys, monkeypatch, argv=()):
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_every_example_is_covered():
    covered = {"generate.py", "pipeline.py", "engine.py", "peft_lora.py", "bitsandbytes_4bit.py", "openai_client.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == covered


@pytest.mark.slow
def test_generate_example(capsys, monkeypatch):
    out = _run("generate.py", capsys, monkeypatch)
    assert "Paris" in out and "blocks in use:" in out


@pytest.mark.slow
def test_pipeline_example(capsys, monkeypatch):
    assert "Paris" in _run("pipeline.py", capsys, monkeypatch)


@pytest.mark.slow
def test_engine_example(capsys, monkeypatch):
    out = _run("engine.py", capsys, monkeypatch)
    assert "Paris" in out and "blocks in use after the abort: 0" in out
    # Only the first conversation misses the prefix cache; the next two reuse its system-prompt blocks.
    assert out.count("(prompt tokens from the prefix cache: 0)") == 1
    assert "step 5 story:" in out
    assert out.count("sample ") == 3 and out.count("beam (score") == 3


def test_peft_example(capsys, monkeypatch):
    pytest.importorskip("peft")
    out = _run("peft_lora.py", capsys, monkeypatch)
    assert "paged == default cache: True" in out and "adapter beta:" in out


def test_bitsandbytes_example(capsys, monkeypatch):
    pytest.importorskip("bitsandbytes")
    out = _run("bitsandbytes_4bit.py", capsys, monkeypatch)
    assert "paged == default cache: True" in out and "engine == generate: True" in out


def test_openai_client_example(capsys, monkeypatch):
    pytest.importorskip("openai")
    from hf_paged.server import build_app
    from tests.server.conftest import LiveServer, tiny_llm

    server = LiveServer(build_app(tiny_llm(seed=3).engine, "tiny-llama"))
    try:
        out = _run("openai_client.py", capsys, monkeypatch, ["--base-url", f"{server.url}/v1"])
    finally:
        server.stop()
    assert "model: tiny-llama" in out and "chat:" in out and "usage:" in out

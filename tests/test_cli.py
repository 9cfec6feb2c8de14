"""`hf-paged`: its output against plain HF generate (DynamicCache) on the embedded SmolLM2, and its errors."""

import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import hf_paged
from hf_paged import PagedCache
from hf_paged.blocks import DEFAULT_BLOCK_SIZE
from hf_paged.cli import main
from hf_paged.models import load_model

FRANCE = "What is the capital of France?"
PROMPTS = [FRANCE, "Name a fruit."]
NEW = "12"  # --max-new-tokens of every test run


def run(argv, capsys):
    """main(argv) in-process: (exit status, stdout, stderr)."""
    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def reference(prompts, chat=True, system=None, seed=None, **generate_kwargs) -> list[str]:
    """Plain HF generate with its default DynamicCache and attention: the ground truth the CLI must match."""
    model, tokenizer = load_model()
    if chat:
        conversations = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
                         for p in prompts]
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(**inputs, max_new_tokens=int(NEW), pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def france():
    return reference([FRANCE])[0]


@pytest.fixture(scope="module")
def batch():
    return reference(PROMPTS)


@pytest.fixture
def paged_block_sizes(monkeypatch):
    """The block_size of every PagedCache built while the test runs (proof that generate went paged)."""
    sizes = []
    init = PagedCache.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        sizes.append(self.block_size)

    monkeypatch.setattr(PagedCache, "__init__", spy)
    return sizes


# ------------------------------------------------------------------------------------------------ generate
# NOTE: first in this file (the first to load the model): the subprocess loads its copy while this process loads its
# own and computes the reference, which halves the wall time on two cores.
@pytest.mark.slow
def test_console_script_answers_france(tmp_path):
    script = Path(sys.executable).with_name("hf-paged")
    assert script.is_file(), "the hf-paged console script is not installed (pip install -e .)"
    proc = subprocess.Popen([str(script), "generate", "--max-new-tokens", NEW, FRANCE],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        expected = reference([FRANCE])[0]
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out == expected + "\n"
    assert "Paris" in out and "Traceback" not in err


@pytest.mark.slow
def test_france_answer_is_plain_generates(capsys, france, paged_block_sizes):
    rc, out, _ = run(["generate", "--max-new-tokens", NEW, FRANCE], capsys)
    assert (rc, out) == (0, france + "\n")
    assert "Paris" in out
    assert paged_block_sizes == [DEFAULT_BLOCK_SIZE]


@pytest.mark.slow
def test_several_prompts_run_as_one_batch_and_print_apart(capsys, batch, paged_block_sizes):
    rc, out, _ = run(["generate", "--max-new-tokens", NEW, *PROMPTS], capsys)
    assert rc == 0
    assert out == f"=== [1/2] {PROMPTS[0]}\n{batch[0]}\n\n=== [2/2] {PROMPTS[1]}\n{batch[1]}\n"
    assert paged_block_sizes == [DEFAULT_BLOCK_SIZE]  # one generate call for both prompts


@pytest.mark.slow
def test_json(capsys, batch):
    rc, out, _ = run(["generate", "--json", "--max-new-tokens", NEW, *PROMPTS], capsys)
    assert rc == 0
    assert json.loads(out) == [{"prompt": p, "output": o} for p, o in zip(PROMPTS, batch)]


@pytest.mark.slow
def test_file_one_prompt_per_line(capsys, tmp_path, batch):
    path = tmp_path / "prompts.txt"
    path.write_text(f"{PROMPTS[0]}\n\n   \n{PROMPTS[1]}\n", encoding="utf-8")
    rc, out, _ = run(["generate", "--json", "--max-new-tokens", NEW, "--file", str(path)], capsys)
    assert rc == 0
    assert json.loads(out) == [{"prompt": p, "output": o} for p, o in zip(PROMPTS, batch)]


@pytest.mark.slow
def test_stdin_one_prompt_per_line(capsys, monkeypatch, batch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(PROMPTS) + "\n"))
    rc, out, _ = run(["generate", "--json", "--max-new-tokens", NEW], capsys)
    assert rc == 0
    assert [r["output"] for r in json.loads(out)] == batch


@pytest.mark.slow
def test_stream_prints_the_same_text(capsys, france):
    rc, out, _ = run(["generate", "--stream", "--max-new-tokens", NEW, FRANCE], capsys)
    assert (rc, out) == (0, france + "\n")


@pytest.mark.slow
def test_beams_and_block_size(capsys, paged_block_sizes):
    rc, out, _ = run(["generate", "--num-beams", "2", "--block-size", "4", "--max-new-tokens", NEW, FRANCE], capsys)
    assert (rc, out) == (0, reference([FRANCE], num_beams=2)[0] + "\n")
    assert paged_block_sizes == [4]


@pytest.mark.slow
def test_sampling_with_seed(capsys):
    argv = ["generate", "--temperature", "0.9", "--top-p", "0.9", "--top-k", "20", "--seed", "3", "--max-new-tokens",
            NEW, "Tell me a story."]
    expected = reference(["Tell me a story."], seed=3, do_sample=True, temperature=0.9, top_p=0.9, top_k=20)[0]
    rc, out, _ = run(argv, capsys)
    assert (rc, out) == (0, expected + "\n")


@pytest.mark.slow
def test_no_chat_and_system_prompt(capsys):
    rc, out, _ = run(["generate", "--no-chat", "--max-new-tokens", NEW, "The capital of France is"], capsys)
    assert (rc, out) == (0, reference(["The capital of France is"], chat=False)[0] + "\n")
    system = "You answer in one word."
    rc, out, _ = run(["generate", "--system", system, "--max-new-tokens", NEW, FRANCE], capsys)
    assert (rc, out) == (0, reference([FRANCE], system=system)[0] + "\n")


# ------------------------------------------------------------------------------------------------ errors
class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["generate", ""], None, "hf-paged generate: error: prompt 1 is empty"),
        (["generate", "hi", "   "], None, "hf-paged generate: error: prompt 2 is empty"),
        (["generate"], _Tty(), "hf-paged generate: error: no prompt: give PROMPT arguments, --file PATH, or pipe"),
        (["generate"], io.StringIO("\n \n"), "hf-paged generate: error: no prompt: stdin was empty"),
        (["generate", "--file", "{tmp}/missing.txt"], None, "error: cannot read --file {tmp}/missing.txt"),
        (["generate", "--file", "{tmp}/empty.txt"], None, "error: --file {tmp}/empty.txt holds no prompt"),
        (["generate", "a", "b", "--stream"], None, "error: --stream takes one prompt, got 2"),
        (["generate", "a", "--stream", "--json"], None, "error: --stream and --json cannot be combined"),
        (["generate", "a", "--stream", "--num-beams", "2"], None, "error: --stream cannot be combined with --num-beams"),
        (["generate", "a", "--top-p", "0.9"], None, "error: --top-p / --top-k apply to sampling only"),
        (["generate", "a", "--no-chat", "--system", "s"], None, "error: --system needs chat mode"),
        (["generate", "--model", "{tmp}/nope", "a"], None, "error: model '{tmp}/nope' not found"),
        (["generate", "--device", "gpu0", "a"], None, "error: device 'gpu0' is not a torch device"),
        (["generate", "--max-new-tokens", "0", "a"], None, "error: argument --max-new-tokens: must be >= 1, got 0"),
        (["generate", "--temperature", "-1", "a"], None, "error: argument --temperature: must be >= 0, got -1"),
        (["generate", "--top-p", "1.5", "a"], None, "error: argument --top-p: must be in (0, 1], got 1.5"),
        (["generate", "--seed", "x", "a"], None, "error: argument --seed: expected an integer, got 'x'"),
        (["generate", "a", "--bogus"], None, "hf-paged generate: error: unrecognized arguments: --bogus"),
        ([], None, "hf-paged: error: the following arguments are required: COMMAND"),
        (["bench"], None, "hf-paged bench: error: the following arguments are required: BENCHMARK"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, stdin, message, capsys, monkeypatch, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    rc, out, err = run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert rc == 2 and out == ""
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert err.count("\n") == 1 and err.endswith("\n")


def test_console_script_error_has_no_traceback(tmp_path):
    script = Path(sys.executable).with_name("hf-paged")
    done = subprocess.run([str(script), "generate", "--model", "no/such-model", "hi"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("hf-paged generate: error: model 'no/such-model' not found")
    assert done.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------ the rest
def test_version(capsys):
    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.startswith(f"hf-paged {hf_paged.__version__} (transformers ")


def test_generate_help_lists_every_option(capsys):
    rc, out, _ = run(["generate", "--help"], capsys)
    assert rc == 0 and out.startswith("usage: hf-paged generate")
    for option in ["--file", "--model", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed",
                   "--num-beams", "--chat, --no-chat", "--system", "--stream", "--block-size", "--dtype", "--device",
                   "--json", "(default: 64)", f"(default: {DEFAULT_BLOCK_SIZE})", "SmolLM2-135M-Instruct"]:
        assert option in out, option


def test_bench_kernels_gets_the_rest_of_argv(capsys, monkeypatch):
    seen = []
    fake = types.ModuleType("hf_paged.bench.kernels")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "hf_paged.bench.kernels", fake)
    rc, _, _ = run(["bench", "kernels", "--tiny", "--contexts", "64", "128", "--out=x.json"], capsys)
    assert rc == 3 and seen == [["--tiny", "--contexts", "64", "128", "--out=x.json"]]


def test_bench_kernels_missing(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "hf_paged.bench.kernels", None)  # import fails with ModuleNotFoundError
    rc, out, err = run(["bench", "kernels", "--tiny"], capsys)
    assert (rc, out) == (2, "")
    assert err == "hf-paged bench kernels: error: the benchmark hf_paged.bench.kernels is not part of this installation\n"


def test_bench_kernels_help_is_the_benchmarks(capsys):
    pytest.importorskip("hf_paged.bench.kernels")
    rc, out, _ = run(["bench", "kernels", "--help"], capsys)
    assert rc == 0 and out.startswith("usage: hf-paged bench kernels") and "--tiny" in out


@pytest.mark.parametrize("bench", ["throughput", "memory"])
def test_bench_throughput_and_memory_help(capsys, bench):
    rc, out, _ = run(["bench", bench, "--help"], capsys)
    assert rc == 0 and out.startswith(f"usage: hf-paged bench {bench}")


def test_serve_help_reads_like_vllm(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for option in ("--host", "--port", "--api-key", "--block-size", "--max-num-seqs", "--max-num-batched-tokens"):
        assert option in out


def test_cli_without_the_server_extra():
    # The README's first command installs only the `gguf` extra: `hf-paged` (whose parser lists `serve`), the
    # engine and the model loader must import without the other extras, and `serve` must name its extra before
    # loading a model.
    code = ("import sys\n"
            "for name in ('fastapi', 'uvicorn', 'prometheus_client', 'peft', 'bitsandbytes', 'matplotlib'):\n"
            "    sys.modules[name] = None  # as if not installed: importing it raises ImportError\n"
            "from hf_paged.cli import build_parser, main\n"
            "import hf_paged.engine, hf_paged.models\n"
            "build_parser()\n"
            "rc = main(['serve', '--port', '0'])\n"
            "from hf_paged.server import __main__ as module\n"
            "try:\n"
            "    module.main(['--port', '0'])  # python -m hf_paged.server\n"
            "except SystemExit as exit:\n"
            "    print('rc', rc, exit.code, 'loaded', 'hf_paged.server.app' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "rc 1 1 loaded False", done.stderr[-2000:]
    hint = ("error: the server needs fastapi, uvicorn, prometheus_client (the 'server' extra): "
            "pip install 'hf_paged[server]'")
    assert done.stderr.strip().splitlines()[-2:] == [f"hf-paged serve: {hint}", f"python -m hf_paged.server: {hint}"]

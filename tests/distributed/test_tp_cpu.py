"""Tensor parallelism on CPU: 2 processes on gloo under torchrun give the single-process tokens."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_paged
from tests.tiny import COMMON

WORKER = Path(__file__).with_name("tp_worker.py")
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18], [20, 21]]


TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None and not TORCHRUN.exists(),
                                    reason="torchrun not installed")


def _saved_model(path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON, num_key_value_heads=2)).eval()
    model.save_pretrained(path)
    (path / "prompts.json").write_text(json.dumps(PROMPTS))
    return model


def _torchrun(worker: Path, path: Path) -> list:
    out = path / "result.json"
    proc = subprocess.run(
        [str(TORCHRUN if TORCHRUN.exists() else "torchrun"), "--standalone", "--nproc_per_node", "2",
         str(worker), str(path), str(out)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@needs_torchrun
def test_two_rank_tensor_parallel_matches_one_process(tmp_path):
    model = _saved_model(tmp_path)
    ranks = _torchrun(WORKER, tmp_path)

    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = (ids != 0).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    greedy = model.generate(ids, **kwargs).tolist()
    beams = model.generate(ids, num_beams=3, **kwargs).tolist()
    for rank in ranks:
        assert rank["kv_heads_per_rank"] == 1  # each rank's pool holds its shard of the 2 KV heads
        assert rank["greedy"] == greedy
        assert rank["beams"] == beams
        assert rank["engine_greedy"] == [row[width:] for row in greedy]
        assert rank["sampled"] == ranks[0]["sampled"]  # every rank follows rank 0's samples


@needs_torchrun
def test_tensor_parallel_serving_follows_rank_0(tmp_path):
    model = _saved_model(tmp_path)
    ranks = _torchrun(WORKER.with_name("tp_serve_worker.py"), tmp_path)
    lead, follower = ranks
    llm = hf_paged.LLM(model, num_blocks=128, block_size=4)
    greedy = hf_paged.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    assert [lead[f"greedy-{i}"] for i in range(len(PROMPTS))] == expected
    assert lead["late"] == expected[0]  # joined the running batch mid-way
    seeded = hf_paged.SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=7)
    assert lead["seeded"] == llm.generate([PROMPTS[0]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert len(lead["free"]) == 10 and 3 <= len(lead["long"]) < 200  # the long one was aborted
    # Every rank ends with the same empty engine: the abort and all finished requests were mirrored.
    assert lead["left"] == follower["left"] == [False, 0]


def test_tensor_parallel_size_without_torchrun_is_a_clear_error(monkeypatch):
    from hf_paged.engine.tp import init_tensor_parallel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        init_tensor_parallel(2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="torchrun started 4 processes"):
        init_tensor_parallel(2)

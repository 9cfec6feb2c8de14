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


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_two_rank_tensor_parallel_matches_one_process(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON, num_key_value_heads=2)).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    out = tmp_path / "result.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun if torchrun.exists() else "torchrun"), "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(tmp_path), str(out)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())

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

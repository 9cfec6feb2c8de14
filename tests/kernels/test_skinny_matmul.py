"""Triton skinny matmul (kernels/skinny_matmul.py) against F.linear in fp32, and `ops.linear`'s dispatch."""

import pytest
import torch
import torch.nn.functional as F

from hf_paged.kernels import ops
from hf_paged.kernels.skinny_matmul import skinny_linear
from hf_paged.kernels.tuning import SkinnyConfig
from tests.kernels.paged_inputs import DEVICE, TOLERANCES

on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def check(lead, n, k, dtype, bias=False, config=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    out = skinny_linear(x, weight, b, config)
    ref = F.linear(x.double(), weight.double(), None if b is None else b.double()).to(dtype)
    assert out.shape == (*lead, n) and out.dtype == dtype
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    return out


@pytest.mark.parametrize("m", [1, 2, 5, 16, 33])
@pytest.mark.parametrize("n, k, split", [(40, 96, 1), (70, 200, 3), (64, 256, 2), (33, 64, 4)])
def test_skinny_matches_linear(m, n, k, split):
    """Ragged N and K (masked strips and shares), splits that leave the last share short or empty; x padded to 16,
    32 or 64 rows."""
    check((m,), n, k, torch.float32, bias=split % 2 == 1, config=SkinnyConfig(16, 32, split, 4, 2), seed=m + n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skinny_half_precision_and_leading_dims(dtype):
    check((1, 3), 48, 160, dtype, bias=True, config=SkinnyConfig(16, 32, 2, 4, 2))


def test_skinny_split_is_deterministic_and_leaves_counters_zero():
    """The last program of each strip adds the partials in split order: the same bits as unsplit order-free sums
    would not give, twice in a row; and every counter it used is zero again afterwards."""
    from hf_paged.kernels.paged_decode import arrival_counters

    first = check((3,), 50, 512, torch.float32, config=SkinnyConfig(16, 32, 8, 4, 2), seed=1)
    second = check((3,), 50, 512, torch.float32, config=SkinnyConfig(16, 32, 8, 4, 2), seed=1)
    assert torch.equal(first, second)
    assert int(arrival_counters(torch.device(DEVICE), 1).abs().sum()) == 0


@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("n, k, persistent", [
    (40, 96, 1),  # 3 strips x 3 K tiles over 4 programs: strips shared by two programs
    (16, 512, 2),  # one strip over 8 programs: every program inside it (one partial slot each)
    (200, 32, 1),  # 13 strips of one tile: whole strips only, 3-4 a program
    (70, 200, 3),  # ragged N and K, 5 x 7 items over 12 programs
    (64, 256, 1),  # even: no masks
])
def test_stream_k_matches_linear(m, n, k, persistent):
    """Stream-K (SkinnyConfig.persistent, the CPU interpreter counting 4 SMs): whatever share of a strip each
    program holds, the strips come out whole, the bias added once."""
    check((m,), n, k, torch.float32, bias=n % 2 == 0, config=SkinnyConfig(16, 32, persistent=persistent),
          seed=m + n)


def test_stream_k_is_deterministic_and_leaves_counters_zero():
    from hf_paged.kernels.paged_decode import arrival_counters

    config = SkinnyConfig(16, 32, persistent=2)
    first = check((5,), 50, 512, torch.float32, config=config, seed=2)
    assert torch.equal(first, check((5,), 50, 512, torch.float32, config=config, seed=2))
    assert int(arrival_counters(torch.device(DEVICE), 1).abs().sum()) == 0


def test_skinny_rejects_what_it_cannot_take():
    x, w = torch.randn(65, 32), torch.randn(8, 32)
    with pytest.raises(ValueError, match="at most 64 rows"):
        skinny_linear(x, w)
    with pytest.raises(ValueError, match="disagree"):
        skinny_linear(x[:2], w[:, :16])
    with pytest.raises(TypeError, match="share a dtype"):
        skinny_linear(x[:2], w.half())
    with pytest.raises(ValueError, match="contiguous"):
        skinny_linear(x[:2], torch.randn(32, 8).t())
    with pytest.raises(ValueError, match="powers of 2"):
        SkinnyConfig(block_n=24)
    with pytest.raises(ValueError, match="persistent >= 0"):
        SkinnyConfig(persistent=-1)


def test_default_config_by_weight_shape(monkeypatch):
    """The H100's tiles (132 SMs, 228 KiB of shared memory each): wide weights unsplit and six stages deep,
    o in 16-row strips, down halved along its long K; under HF_PAGED_SKINNY_GRID=stream one program an SM dealt an
    even share of the (strip, K tile) items, whatever the shape."""
    from hf_paged.kernels import tuning

    gpu = torch.device("cuda", 0)  # its facts stubbed below: no GPU needed
    monkeypatch.setattr(tuning, "_num_sms", lambda device: 132)
    monkeypatch.setattr(tuning, "_shared_memory", lambda device: 228 * 1024)
    config = tuning.default_skinny_config
    assert config(4, 12288, 4096, gpu) == SkinnyConfig(64, 128, 1, 4, 6)  # q/k/v
    assert config(4, 32000, 4096, gpu) == SkinnyConfig(64, 128, 1, 4, 6)  # LM head
    assert config(4, 4096, 4096, gpu) == SkinnyConfig(16, 256, 1, 4, 4)  # o
    assert config(4, 4096, 11008, gpu) == SkinnyConfig(64, 128, 2, 4, 4)  # down
    monkeypatch.setenv("HF_PAGED_SKINNY_GRID", "stream")
    for n, k in ((12288, 4096), (4096, 4096), (4096, 11008), (32000, 4096)):
        assert config(4, n, k, gpu) == SkinnyConfig(64, 128, 1, 4, 6, persistent=1)
    monkeypatch.setenv("HF_PAGED_SKINNY_GRID", "strips")
    monkeypatch.setattr(tuning, "_num_sms", lambda device: 58)  # less shared memory: 4 stages
    monkeypatch.setattr(tuning, "_shared_memory", lambda device: 100 * 1024)
    assert config(4, 12288, 4096, gpu) == SkinnyConfig(64, 128, 1, 4, 4)
    monkeypatch.setenv("HF_PAGED_SKINNY_GRID", "stream")
    assert config(4, 12288, 4096, gpu) == SkinnyConfig(64, 128, 1, 4, 4, persistent=1)
    monkeypatch.setenv("HF_PAGED_SKINNY_GRID", "spiral")
    with pytest.raises(ValueError, match="HF_PAGED_SKINNY_GRID"):
        config(4, 12288, 4096, gpu)


def test_ops_linear_takes_the_skinny_kernel_up_to_16_rows(monkeypatch):
    """`ops.linear` on the Triton path: skinny for <= 16 rows of a plain layout, F.linear otherwise; exact to it."""
    monkeypatch.setenv("HF_PAGED_KERNELS", "triton")
    calls = []
    import hf_paged.kernels.skinny_matmul as skinny

    monkeypatch.setattr(skinny, "skinny_linear", lambda *a: calls.append(a[0].shape) or F.linear(*a))
    w = torch.randn(24, 32, device=DEVICE)
    for rows, expect in ((1, 1), (16, 2), (17, 2)):
        x = torch.randn(rows, 32, device=DEVICE)
        torch.testing.assert_close(ops.linear(x, w), F.linear(x, w))
        assert len(calls) == expect
    ops.linear(torch.randn(2, 32, device=DEVICE), w.t().contiguous().t())  # weight not K-contiguous: F.linear
    assert len(calls) == 2
    x = torch.randn(40, 32, device=DEVICE)
    torch.testing.assert_close(ops.linear(x, w, None, 64), F.linear(x, w))  # a higher limit: up to 64 rows
    assert len(calls) == 3
    for value, rows in (("off", 0), ("", 0), ("on", 16), ("16", 16), ("32", 32), ("64", 64)):
        monkeypatch.setenv("HF_PAGED_SKINNY_MATMUL", value)
        assert ops.skinny_matmul() == rows
    monkeypatch.setenv("HF_PAGED_SKINNY_MATMUL", "maybe")
    with pytest.raises(ValueError, match="HF_PAGED_SKINNY_MATMUL"):
        ops.skinny_matmul()


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("m", [1, 3, 16, 32, 64])
@pytest.mark.parametrize("n, k", [(12288, 4096), (4096, 4096), (4096, 11008), (32000, 4096), (1000, 1000)])
def test_gpu_skinny_at_model_shapes(m, n, k):
    check((m,), n, k, torch.bfloat16, bias=n == 1000, seed=m)  # the default tiles
    check((m,), n, k, torch.bfloat16, bias=n == 1000, seed=m, config=SkinnyConfig(64, 128, 1, 4, 6, persistent=1))


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("persistent", [1, 2, 8])
def test_gpu_stream_k_is_deterministic_under_contention(persistent):
    """Many programs sharing each strip arrive in whatever order the GPU runs them: the sum is still in program
    order (the same bits every time) and every counter is back at zero."""
    from hf_paged.kernels.paged_decode import arrival_counters

    config = SkinnyConfig(32, 64, persistent=persistent)
    first = check((16,), 4096, 11008, torch.bfloat16, config=config, seed=3)
    for _ in range(5):
        assert torch.equal(first, check((16,), 4096, 11008, torch.bfloat16, config=config, seed=3))
    assert int(arrival_counters(torch.device("cuda"), 1).abs().sum()) == 0


@pytest.mark.cuda
@on_gpu
def test_gpu_skinny_in_a_cuda_graph():
    """Replayed from a CUDA graph on new inputs, the split and the stream-K kernels give the eager result (their
    counters reset)."""
    x = torch.randn(4, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    for config in (SkinnyConfig(64, 128, 8), SkinnyConfig(64, 128, persistent=1)):
        replays_as_eager(x, w, config)


def replays_as_eager(x, w, config):
    skinny_linear(x, w, config=config)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_linear(x, w, config=config)
    for _ in range(3):
        x.normal_()
        graph.replay()
        torch.testing.assert_close(out, skinny_linear(x, w, config=config), atol=0, rtol=0)

"""One backend naming rule for softmax and linear attention: a backend is named for its kernels.

``backend="triton"`` selects the Triton kernels for both kinds of attention, on CUDA and (under
TRITON_INTERPRET=1, which conftest.py sets) on CPU; ``"auto"`` picks Triton only where it is the fast choice
(CUDA); the retired ``"triton_interpret"`` raises a ValueError that says to use ``"triton"``. Each case checks
which kernels ran (a counting wrapper around the Triton entry point) and the value against a float64 reference.
CUDA cases skip with "no GPU" on machines without one.
"""

import importlib.util

import pytest
import torch
from tests.checks import rel_err

from seqpar.kernels.attention import attention_block, get_attention_backend
from seqpar.kernels.linear import get_linear_backend, linear_attention_chunk
from seqpar.kernels.reference import reference_attention, reference_linear_attention

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
CPU = torch.device("cpu")
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts calls into the Triton attention launcher and the Triton linear-attention autograd function."""
    from seqpar.kernels import triton_attention, triton_linear

    calls = {"attention": 0, "linear": 0}
    launch, chunk_apply = triton_attention._forward, triton_linear._ChunkLinearAttention.apply

    def counted_launch(*args, **kwargs):
        calls["attention"] += 1
        return launch(*args, **kwargs)

    def counted_apply(*args, **kwargs):
        calls["linear"] += 1
        return chunk_apply(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "_forward", counted_launch)
    monkeypatch.setattr(triton_linear._ChunkLinearAttention, "apply", counted_apply)
    return calls


def _attention_inputs(device):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 20, 4, 16, generator=gen)
    k, v = torch.randn(1, 20, 2, 16, generator=gen), torch.randn(1, 20, 2, 16, generator=gen)
    return [t.to(device) for t in (q, k, v)]


def _linear_inputs(device):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 24, 2, 16, generator=gen) * 0.5 for _ in range(3))
    g = -torch.rand(1, 24, 2, generator=gen) * 0.3
    return [t.to(device) for t in (q, k, v, g)]


def _run_attention(backend, device):
    q, k, v = _attention_inputs(device)
    out, _ = attention_block(q, k, v, causal=True, backend=backend)
    ref, _ = reference_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=True)
    return rel_err(out.double().cpu(), ref)


def _run_linear(backend, device):
    q, k, v, g = _linear_inputs(device)
    out, _ = linear_attention_chunk(q, k, v, log_decay=g, chunk_size=16, backend=backend)
    ref, _ = reference_linear_attention(*(t.double().cpu() for t in (q, k, v)), log_decay=g.double().cpu())
    return rel_err(out.double().cpu(), ref)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_triton_selects_triton_kernels_for_both_kinds(device, triton_calls):
    dev = torch.device(device)
    assert get_attention_backend("triton", dev, torch.float32).name == "triton"
    assert get_linear_backend("triton", dev, torch.float32).name == "triton"
    assert _run_attention("triton", device) < 1e-5
    assert _run_linear("triton", device) < 1e-5
    assert triton_calls == {"attention": 1, "linear": 1}


@pytest.mark.parametrize("device", DEVICES)
def test_torch_selects_torch_kernels_for_both_kinds(device, triton_calls):
    dev = torch.device(device)
    assert get_attention_backend("torch", dev, torch.float32).name == "torch"
    assert get_linear_backend("torch", dev, torch.float32).name == "torch"
    assert _run_attention("torch", device) < 1e-5
    assert _run_linear("torch", device) < 1e-5
    assert triton_calls == {"attention": 0, "linear": 0}


def test_auto_on_cpu_is_torch_for_both_kinds(triton_calls):
    for dtype in (torch.float32, torch.bfloat16):
        assert get_attention_backend("auto", CPU, dtype).name == "torch"
        assert get_linear_backend("auto", CPU, dtype).name == "torch"
    assert _run_attention("auto", "cpu") < 1e-5
    assert _run_linear("auto", "cpu") < 1e-5
    assert triton_calls == {"attention": 0, "linear": 0}


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_auto_on_cuda_is_a_compiled_gpu_backend():
    dev = torch.device("cuda")
    from seqpar.kernels.triton_attention import INTERPRETED

    if INTERPRETED:
        pytest.skip("no GPU compilation under TRITON_INTERPRET=1: 'auto' never picks an emulation")
    assert get_attention_backend("auto", dev, torch.bfloat16).name in ("flash_attn", "triton")
    assert get_linear_backend("auto", dev, torch.bfloat16).name == "triton"


@pytest.mark.parametrize("device", DEVICES)
def test_retired_triton_interpret_name_says_use_triton(device):
    dev = torch.device(device)
    with pytest.raises(ValueError, match=r"backend: 'triton_interpret' was removed; use backend='triton'"):
        get_attention_backend("triton_interpret", dev, torch.float32)
    with pytest.raises(ValueError, match=r"backend: 'triton_interpret' was removed; use backend='triton'"):
        get_linear_backend("triton_interpret", dev, torch.float32)
    q, k, v = _attention_inputs(device)
    with pytest.raises(ValueError, match="use backend='triton'"):
        attention_block(q, k, v, backend="triton_interpret")


@needs_triton
def test_triton_by_name_refuses_what_its_kernels_cannot_run():
    with pytest.raises(ValueError, match="backend: 'triton' cannot run on cpu with torch.float64"):
        get_attention_backend("triton", CPU, torch.float64)
    with pytest.raises(ValueError, match="backend: 'triton' linear attention cannot run on cpu"):
        get_linear_backend("triton", CPU, torch.float64)

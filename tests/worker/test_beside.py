"""The attention and the GEMM that ops run beside each other, by name, and where a block asks for them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch._subclasses.fake_tensor import FakeTensorMode

from worker.optimizations.beside import attend_named, gelu_projection
from worker.optimizations.epilogues import apply_gemm_epilogues
from worker.optimizations.qk_norm_rope import FusedQKFluxAttnProcessor, apply_fused_qk_norm_rope
from worker.optimizations.symmetric_exchange import attention_back_beside, attention_back_split

from .transformer_support import inputs, relative_rms, tiny_transformer


def test_the_attention_by_backend_name_is_diffusers_dispatch() -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 8, generator=generator) for _ in range(3))
    expected = dispatch_attention_fn(q, k, v)
    for name in ("", "native"):
        out = attend_named(q, k, v, name)
        assert torch.equal(out, expected) and out.is_contiguous()


def test_the_gelu_projection_is_the_tanh_gelu_of_the_linear() -> None:
    hidden, weight, bias = torch.randn(6, 16), torch.randn(32, 16), torch.randn(32)
    expected = F.gelu(F.linear(hidden, weight, bias), approximate="tanh")
    assert torch.equal(gelu_projection(hidden, weight, bias), expected)


def test_the_attention_ops_give_the_ways_back_shapes() -> None:
    with FakeTensorMode():
        received = torch.empty(3, 1, 18, 12, 128, dtype=torch.bfloat16)
        mlp = torch.empty(9, 12288, dtype=torch.bfloat16)
        weight = torch.empty(12288, 3072, dtype=torch.bfloat16)
        result, product = attention_back_beside(received, mlp, weight, "", "group", 2)
        assert result.shape == (1, 9, 2, 12, 128) and product.shape == (9, 3072)
        assert attention_back_split(received, "", "group", 2).shape == (1, 9, 24, 128)


def test_the_processor_names_its_backend_for_the_ops() -> None:
    model = tiny_transformer()
    apply_fused_qk_norm_rope(model)
    assert model.single_transformer_blocks[0].attn.processor._backend_name() == ""
    model.set_attention_backend("native")
    names = {m.processor._backend_name() for m in model.modules() if hasattr(m, "processor")}
    assert names == {"native"}


@torch.no_grad()
def test_one_gpu_single_blocks_attend_in_place() -> None:
    """On one GPU nothing runs beside the attention (measured: no gain), so the processor returns it."""
    expected = tiny_transformer()(**inputs(torch.float32))[0]
    model = tiny_transformer()
    apply_fused_qk_norm_rope(model)
    apply_gemm_epilogues(model)
    attention = model.single_transformer_blocks[0].attn
    assert isinstance(attention.processor, FusedQKFluxAttnProcessor)
    tokens = torch.randn(1, 9, attention.query_dim)
    rope = (torch.ones(9, attention.head_dim), torch.zeros(9, attention.head_dim))
    out = attention.processor(attention, tokens, image_rotary_emb=rope, overlap=True)
    assert isinstance(out, torch.Tensor)
    assert relative_rms(model(**inputs(torch.float32))[0], expected) < 1e-5

"""Adapters for delta-rule linear attention layers: Qwen3-Next's Gated DeltaNet and Kimi Linear's KDA.

Both layers run, per rank on its local tokens: the projections, a short causal conv1d over q/k/v (its w - 1
tokens of left context come from rank r - 1: ``seqpar.runtime.causal_conv1d``), the activation, l2-normalised
q/k (the module's own ``l2norm``), beta and the log decay g, then the gated delta rule over the WHOLE sequence
(``seqpar.runtime.delta_rule_attention``: the delta-rule variant of the plan's linear strategy, LASP-2 or ZeCO),
then the gated norm and the output projection. Everything but the conv and the delta rule is per token.

The math is the module's own, term for term (transformers 5.x): Gated DeltaNet has one decay per head
g = -exp(A_log) softplus(a + dt_bias) and grouped q/k heads (repeated to the value heads, as transformers'
kernel does); KDA has one decay per key channel (``forget_gate``). The delta rule runs in float32 (float64 for
a float64 model), as transformers does, and its output is cast back to the input dtype.

Training forwards only: a cache (``use_cache=True``) raises.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from seqpar import runtime

__all__ = ["delta_rule_dims", "kimi_delta_attention_adapter", "qwen3_next_gated_delta_net_adapter",
           "register_delta_adapters"]


def _check_training_call(module: torch.nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
    """The attention mask (None, or all ones on this shard) and no cache."""
    cache = args[0] if args else None
    for name in ("cache", "cache_params", "past_key_values"):
        cache = cache if kwargs.get(name) is None else kwargs[name]
    if cache is not None:
        raise ValueError(f"cache: seqpar runs training forwards; pass use_cache=False ({type(module).__name__})")
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    if mask is not None and tuple(mask.shape[:2]) == tuple(hidden_states.shape[:2]):
        return mask  # a local padding mask: applied like the module does
    if mask is not None:
        raise ValueError(f"attention_mask: {type(module).__name__} under seqpar takes no global padding mask; "
                         "pass sequences as a list (packed) instead of padding them")
    return None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _conv_activation(module: torch.nn.Module, mixed: torch.Tensor) -> torch.Tensor:
    """transformers' ``causal_conv1d_fn`` (conv in the weight's dtype, then the activation, back to the input
    dtype) over the whole sequence."""
    from transformers.activations import ACT2FN

    weight = module.conv1d.weight.squeeze(1)
    out = runtime.causal_conv1d(mixed.to(weight.dtype), weight, module.conv1d.bias)
    return ACT2FN[module.activation](out).to(mixed.dtype)


def qwen3_next_gated_delta_net_adapter(module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any,
                                       **kwargs: Any) -> torch.Tensor:
    """transformers' ``Qwen3NextGatedDeltaNet`` on the delta-rule SP ops (see the module docstring)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import apply_mask_to_padding_states, l2norm

    mask = _check_training_call(module, hidden_states, args, kwargs)
    hidden_states = apply_mask_to_padding_states(hidden_states, mask)
    b, s, _ = hidden_states.shape
    qkvz = module.in_proj_qkvz(hidden_states)
    ba = module.in_proj_ba(hidden_states)
    query, key, value, z, b_gate, a = module.fix_query_key_value_ordering(qkvz, ba)
    mixed = torch.cat([x.reshape(b, s, -1) for x in (query, key, value)], -1)
    mixed = _conv_activation(module, mixed)
    query, key, value = torch.split(mixed, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    cdt = _compute_dtype(hidden_states)
    query = query.reshape(b, s, -1, module.head_k_dim).to(cdt)
    key = key.reshape(b, s, -1, module.head_k_dim).to(cdt)
    value = value.reshape(b, s, -1, module.head_v_dim).to(cdt)
    beta = b_gate.sigmoid().to(cdt)
    g = (-module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)).to(cdt)
    rep = module.num_v_heads // module.num_k_heads
    if rep > 1:  # each q/k head serves rep consecutive value heads (transformers' kernel does the same)
        query, key = query.repeat_interleave(rep, dim=2), key.repeat_interleave(rep, dim=2)
    query, key = l2norm(query, dim=-1, eps=1e-6), l2norm(key, dim=-1, eps=1e-6)
    out = runtime.delta_rule_attention(query, key, value, beta=beta, log_decay=g, scale=module.head_k_dim ** -0.5)
    out = out.to(hidden_states.dtype)
    z_shape = z.shape
    out = module.norm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1])).reshape(z_shape)
    return module.out_proj(out.reshape(b, s, -1))


qwen3_next_gated_delta_net_adapter.linear_attention = True  # type: ignore[attr-defined]


def kimi_delta_attention_adapter(module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any,
                                 **kwargs: Any) -> torch.Tensor:
    """transformers' ``KimiLinearDeltaAttention`` (KDA: a decay per key channel) on the delta-rule SP ops."""
    from transformers.models.kimi_linear.modeling_kimi_linear import apply_mask_to_padding_states, l2norm

    mask = _check_training_call(module, hidden_states, args, kwargs)
    hidden_states = apply_mask_to_padding_states(hidden_states, mask)
    b, s, _ = hidden_states.shape
    shape = (b, s, -1, module.head_dim)
    mixed = torch.cat([module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)], -1)
    mixed = _conv_activation(module, mixed)
    query, key, value = torch.split(mixed, [module.qkv_dim] * 3, dim=-1)
    cdt = _compute_dtype(hidden_states)
    query, key, value = (x.reshape(shape).to(cdt) for x in (query, key, value))
    g = module.forget_gate(hidden_states).to(cdt)
    beta = torch.sigmoid(module.b_proj(hidden_states)).to(cdt)
    query, key = l2norm(query, dim=-1, eps=1e-6), l2norm(key, dim=-1, eps=1e-6)
    out = runtime.delta_rule_attention(query, key, value, beta=beta, log_decay=g, scale=module.head_dim ** -0.5)
    out = out.to(hidden_states.dtype)
    gate = module.g_b_proj(module.g_a_proj(hidden_states)).view(shape)
    return module.o_proj(module.o_norm(out, gate).reshape(b, s, -1))


kimi_delta_attention_adapter.linear_attention = True  # type: ignore[attr-defined]


def register_delta_adapters(register) -> None:
    """Register the adapters of the delta-rule layers transformers has (``register(cls, fn)``)."""
    try:
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet
    except ImportError:
        pass
    else:
        register(Qwen3NextGatedDeltaNet, qwen3_next_gated_delta_net_adapter)
    try:
        from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention
    except ImportError:
        pass
    else:
        register(KimiLinearDeltaAttention, kimi_delta_attention_adapter)


def delta_rule_dims(module: torch.nn.Module) -> tuple[int, int, int] | None:
    """(H, D_k, D_v) of the delta rule a module runs on its adapter, None for any other module: Gated DeltaNet
    (its value heads: the grouped key heads are repeated to them, ``head_k_dim``, ``head_v_dim``), KDA
    (``num_heads``, ``head_dim`` for both). What the cost model sizes delta-rule layers with."""
    from seqpar import integrations

    adapter = integrations.adapter_for(module)
    if adapter is qwen3_next_gated_delta_net_adapter:
        return module.num_v_heads, module.head_k_dim, module.head_v_dim
    if adapter is kimi_delta_attention_adapter:
        return module.num_heads, module.head_dim, module.head_dim
    return None

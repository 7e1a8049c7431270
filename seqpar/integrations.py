"""How seqpar reaches the attention of models it did not write.

1. Hugging Face transformers: a ``"seqpar"`` attention function registered with ``AttentionInterface`` (and a
   mask function that builds no mask: the SP ops apply the causal mask in global positions themselves).
2. Any module that calls ``torch.nn.functional.scaled_dot_product_attention``: a ``TorchFunctionMode`` active
   during the wrapped forward routes those calls to the SP op.
3. Adapters keyed by module class, for attention modules with their own math (``register_adapter``); the
   built-in one runs transformers' ``MiniMaxLightningAttention`` (linear attention with per-head decay) on
   LASP-2 or ZeCO.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from seqpar import runtime

# ----------------------------------------------------------------------------------------------------
# 1. Hugging Face
# ----------------------------------------------------------------------------------------------------

HF_ATTENTION_NAME = "seqpar"
# HF attention kwargs that change the math; the SP ops do plain causal/bidirectional softmax attention.
UNSUPPORTED_HF_KWARGS = ("sliding_window", "softcap", "s_aux")


def hf_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, H, S_local, D) -> ((B, S_local, H, D), None)."""
    for name in UNSUPPORTED_HF_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: seqpar's SP attention does not implement {name}; use a model config without it")
    if dropout:
        raise ValueError("dropout: attention dropout is not supported by the SP ops; set attention_dropout=0")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = runtime.softmax_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=bool(causal), scale=scaling
    )
    return out, None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def register_hf() -> bool:
    """Register the attention and mask functions with transformers; False when transformers is missing."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(HF_ATTENTION_NAME, hf_attention_forward)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, _no_mask)
    return True


def is_hf_model(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "_attn_implementation") and hasattr(model, "set_attn_implementation")


def check_hf_config(model: torch.nn.Module) -> None:
    """Reject configs whose attention math the SP ops do not implement, naming the module."""
    config = model.config
    sub = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(sub, "sliding_window", None) and getattr(sub, "use_sliding_window", True):
        raise ValueError(
            f"model: {type(model).__name__} uses sliding-window attention (config.sliding_window="
            f"{sub.sliding_window}), which the SP ops do not implement; set config.sliding_window=None"
        )
    for attr in ("attn_logit_softcapping",):
        if getattr(sub, attr, None):
            raise ValueError(
                f"model: {type(model).__name__} sets config.{attr}; seqpar's SP attention does not implement it"
            )
    if getattr(sub, "attention_dropout", 0.0):
        raise ValueError(f"model: {type(model).__name__} has attention_dropout={sub.attention_dropout}; set it to 0")


# ----------------------------------------------------------------------------------------------------
# 2. scaled_dot_product_attention
# ----------------------------------------------------------------------------------------------------


def _sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


class SDPAInterceptor(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` (q: (B, H, S_local, D)) to the current SP op."""

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        a = _sdpa_arguments(args, kwargs)
        if a.get("attn_mask") is not None:
            raise ValueError(
                "attn_mask: seqpar cannot shard an explicit attention mask; use is_causal=True (packed sequences "
                "are kept apart through cu_seqlens by seqpar itself)"
            )
        if a.get("dropout_p", 0.0):
            raise ValueError("dropout_p: attention dropout is not supported by the SP ops; pass dropout_p=0")
        q, k, v = a["query"], a["key"], a["value"]
        if k.shape[-3] != q.shape[-3] and not a.get("enable_gqa", False):
            raise ValueError("key: fewer key/value heads than query heads needs enable_gqa=True")
        out = runtime.softmax_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=bool(a.get("is_causal", False)),
            scale=a.get("scale"),
        )
        return out.transpose(1, 2)


def calls_sdpa(module: torch.nn.Module) -> bool:
    """Whether the module's own forward source mentions scaled_dot_product_attention (a static check)."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return "scaled_dot_product_attention" in source


# ----------------------------------------------------------------------------------------------------
# 3. Adapters
# ----------------------------------------------------------------------------------------------------

Adapter = Callable[..., Any]
_ADAPTERS: dict[type, Adapter] = {}


def register_adapter(cls: type, fn: Adapter) -> None:
    """Run ``fn(module, *args, **kwargs)`` instead of ``cls.forward`` inside seqpar-parallelized forwards.

    ``fn`` computes the module's output from its LOCAL tokens and calls ``seqpar.runtime.softmax_attention`` or
    ``seqpar.runtime.linear_attention`` for the part that needs the whole sequence.
    """
    if not isinstance(cls, type) or not callable(fn):
        raise ValueError("cls: register_adapter(cls, fn) takes a module class and a callable")
    _ADAPTERS[cls] = fn


def adapter_for(module: torch.nn.Module) -> Adapter | None:
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


def is_linear_adapter(module: torch.nn.Module) -> bool:
    fn = adapter_for(module)
    return bool(fn is not None and getattr(fn, "linear_attention", False))


def minimax_lightning_adapter(module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
    """transformers' MiniMaxLightningAttention on LASP-2/ZeCO.

    Its recurrence is S_t = exp(-slope_h) S_{t-1} + k_t v_t^T, o_t = q_t^T S_t (no softmax scale), so the SP op
    gets log_decay = -slope (per head) and scale = 1; the module's activation, norm, gate and projections are kept.
    A packed batch runs as one SP call with the context's ``cu_seqlens`` (``seqpar.runtime.linear_attention``):
    the state resets at every sequence boundary.
    """
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError("cache: seqpar runs training forwards; pass use_cache=False")
    b, s, _ = hidden_states.shape
    h, d = module.num_attention_heads, module.head_dim
    qkv = module.act_fn(module.qkv_proj(hidden_states)).reshape(b, s, h, 3 * d)
    q, k, v = torch.split(qkv, d, dim=3)
    log_decay = -module.slope_rate.reshape(h).to(torch.float32)
    out = runtime.linear_attention(q, k, v, log_decay=log_decay, scale=1.0).to(hidden_states.dtype)
    out = module.norm(out.reshape(b, s, h * d))
    out = torch.sigmoid(module.output_gate(hidden_states)) * out
    return module.out_proj(out), None


minimax_lightning_adapter.linear_attention = True  # type: ignore[attr-defined]


def register_builtin_adapters() -> None:
    from seqpar.integrations_delta import register_delta_adapters  # Gated DeltaNet (Qwen3-Next), KDA (Kimi Linear)
    register_delta_adapters(register_adapter)
    try:
        from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention
    except ImportError:
        return
    register_adapter(MiniMaxLightningAttention, minimax_lightning_adapter)

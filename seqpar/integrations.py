"""How seqpar reaches the attention of models it did not write.

1. Hugging Face transformers: a ``"seqpar"`` attention function registered with ``AttentionInterface`` (and a
   mask function that builds no mask: the SP ops apply the causal mask in global positions themselves). Each
   layer's call carries its own options (sliding window, softcap, sinks); outside an SP step both functions run
   the model's original implementation, so the wrapped model still evaluates and generates.
2. Any module that calls ``torch.nn.functional.scaled_dot_product_attention``: a ``TorchFunctionMode`` active
   during the wrapped forward routes those calls to the SP op.
3. Adapters keyed by module class, for attention modules with their own math (``register_adapter``); the
   built-in one runs transformers' ``MiniMaxLightningAttention`` (linear attention with per-head decay) on
   LASP-2 or ZeCO.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from seqpar import runtime

# Under torch.compile every routed call is one opaque node of the traced graph (``seqpar.custom_ops``: the runtime
# functions switch to the custom ops while Dynamo traces), so the model compiles without graph breaks around its
# attention; these two names stay the entry points of the integrations below and of adapters.


def sp_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any) -> torch.Tensor:
    """``seqpar.runtime.softmax_attention`` (one ``seqpar::softmax_attention`` node under torch.compile)."""
    return runtime.softmax_attention(q, k, v, **options)


def sp_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any) -> torch.Tensor:
    """``seqpar.runtime.linear_attention`` (one ``seqpar::linear_attention`` node under torch.compile)."""
    return runtime.linear_attention(q, k, v, **options)


# ----------------------------------------------------------------------------------------------------
# 1. Hugging Face
# ----------------------------------------------------------------------------------------------------

HF_ATTENTION_NAME = "seqpar"
# Config fields that hold an attention-dropout probability, by model family (GPT2 / MPT: attn_pdrop, BERT:
# attention_probs_dropout_prob, most others: attention_dropout). The SP ops have no dropout.
ATTENTION_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout")
# model_type of families whose attention always adds ALiBi biases (no config switch)
ALWAYS_ALIBI = ("bloom",)

# id(config) -> (config, the attention implementation the model had before parallelize). Outside an SP step the
# "seqpar" attention and mask functions run that implementation, so the wrapped model still works as the
# original (eval, generate); ``SPModel.unwrap`` restores it for good.
_ORIGINAL_ATTENTION: dict[int, tuple[Any, str]] = {}


def remember_original_attention(model: torch.nn.Module, name: str) -> None:
    """Record ``name`` as the implementation every config of ``model`` falls back to outside SP steps."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            _ORIGINAL_ATTENTION[id(config)] = (config, name)


def forget_original_attention(model: torch.nn.Module) -> None:
    for module in model.modules():
        _ORIGINAL_ATTENTION.pop(id(getattr(module, "config", None)), None)


def original_attention_name(config: Any) -> str:
    """The implementation ``config``'s model had before ``parallelize`` ("eager" when unknown)."""
    entry = _ORIGINAL_ATTENTION.get(id(config))
    return entry[1] if entry is not None and entry[0] is config else "eager"


def _original_attention(module: torch.nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = original_attention_name(getattr(module, "config", None))
    if name != "eager":
        return ALL_ATTENTION_FUNCTIONS[name]
    # transformers' eager attention is a function of each model's own modeling file
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(
            f"seqpar: {type(module).__name__} ran outside an SP step and its module has no eager_attention_forward "
            "to fall back to; call sp_model.unwrap() before using the model on its own"
        )
    return fn


def hf_window(sliding_window: int | None, *, causal: bool) -> tuple[int, int] | None:
    """transformers' per-layer ``sliding_window`` W as the SP ops' ``window=(left, right)``.

    transformers' causal sliding-window mask (``masking_utils.sliding_window_overlay``) keeps key j for query i
    when ``i - W < j <= i``: W keys including the query's own, so left = W - 1 and right = 0 (flash-attn's
    ``window_size=(W - 1, 0)``, which transformers' flash path passes too). None or <= 0: no window.
    """
    if sliding_window is None or int(sliding_window) <= 0:
        return None
    if not causal:
        raise ValueError(
            f"sliding_window: a bidirectional sliding window ({sliding_window}) is not supported by seqpar's "
            "attention routing; use a causal model or a config without sliding_window"
        )
    return (int(sliding_window) - 1, 0)


def hf_layer_windows(model: torch.nn.Module) -> tuple[int | None, ...]:
    """Per decoder layer of a transformers model, the causal sliding window W (tokens) its attention call passes
    as ``sliding_window`` (``hf_attention_forward`` runs it as ``window=(W - 1, 0)``), None for full attention
    and for linear-attention layers: the attention module's own ``sliding_window`` where it keeps one per layer
    (Gemma2/3, Qwen2/3, gpt-oss: by ``layer_types``), else the config's, which such models pass to every layer
    (Mistral, Mixtral, Phi3, Starcoder2). For the cost model (``wrapper.default_cost_model``)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = text.num_hidden_layers
    types = list(getattr(text, "layer_types", None) or ["full_attention"] * n)
    windows = [None if t == "linear_attention" else getattr(text, "sliding_window", None) for t in types]
    for module in model.modules():
        index = getattr(module, "layer_idx", None)
        own = isinstance(index, int) and 0 <= index < n and hasattr(module, "sliding_window")
        if own and types[index] != "linear_attention":
            windows[index] = module.sliding_window
    return tuple(int(w) if w is not None and int(w) > 0 else None for w in windows)


def hf_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, H, S_local, D_qk), key (B, H_kv, S_local, D_qk), value
    (B, H_kv, S_local, D_v) -> ((B, S_local, H, D_v), None).

    Inside an SP step it routes the call, with what THIS layer passes (so per-layer windows and alternating
    layer types follow the model): ``sliding_window`` W -> ``window=(W - 1, 0)`` (``hf_window``), ``softcap``
    (Gemma2's ``attn_logit_softcapping``) -> ``softcap``, ``s_aux`` (gpt-oss's per-head sink logits) ->
    ``sinks``. Outside an SP step (eval, ``generate``) it runs the model's original implementation.
    """
    if not runtime.in_sp_step():
        return _original_attention(module)(module, query, key, value, attention_mask, *args, **kwargs)
    if args:
        raise ValueError(f"args: {type(module).__name__} passed {len(args)} positional options to the attention "
                         "function; transformers passes dropout / scaling by keyword")
    if kwargs.get("dropout"):
        raise ValueError(
            f"dropout: {type(module).__name__} applies attention dropout ({kwargs['dropout']}), which the SP ops do "
            "not implement; set the model config's attention dropout to 0 (attention_dropout / attn_pdrop)"
        )
    is_causal = kwargs.get("is_causal")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    options: dict[str, Any] = {}
    window = hf_window(kwargs.get("sliding_window"), causal=causal)
    if window is not None:
        options["window"] = window
    if kwargs.get("softcap") is not None:
        options["softcap"] = float(kwargs["softcap"])
    if kwargs.get("s_aux") is not None:
        options["sinks"] = kwargs["s_aux"]
    out = sp_softmax_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
        scale=kwargs.get("scaling"), **options,
    )
    return out, None


def hf_mask(*args: Any, **kwargs: Any) -> Any:
    """transformers mask function: inside an SP step no mask (the SP ops apply causality, windows and sequence
    boundaries in global positions themselves); outside, the original implementation's mask."""
    if runtime.in_sp_step():
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[original_attention_name(kwargs.get("config"))](*args, **kwargs)


def register_hf() -> bool:
    """Register the attention and mask functions with transformers; False when transformers is missing."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(HF_ATTENTION_NAME, hf_attention_forward)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, hf_mask)
    return True


def is_hf_model(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "_attn_implementation") and hasattr(model, "set_attn_implementation")


def check_hf_config(model: torch.nn.Module) -> None:
    """Refuse, at ``parallelize`` time, what the SP ops cannot compute, naming the model's own config field.

    Sliding windows, softcap and attention sinks are NOT refused: each layer's call carries them
    (``hf_attention_forward``). Refused: attention dropout (``attn_pdrop``, ``attention_dropout``, ...), ALiBi
    biases (Falcon with ``alibi=True``, Bloom, MPT), and models with no attention reaching seqpar (Mamba and
    other state-space models: no module uses transformers' attention interface or SDPA, none has an adapter).
    """
    name = type(model).__name__
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sub_configs = [("", text)]
    if getattr(text, "attn_config", None) is not None:  # MPT keeps its attention options in a sub-config
        sub_configs.append(("attn_config.", text.attn_config))
    for prefix, sub in sub_configs:
        alibi = getattr(sub, "alibi", None) if not isinstance(sub, dict) else sub.get("alibi")
        if alibi:
            raise ValueError(
                f"model: {name} uses ALiBi attention biases (config.{prefix}alibi={alibi}), which seqpar does not "
                "support (the SP ops add no position bias); use a model with rotary or learned positions"
            )
    if getattr(text, "model_type", None) in ALWAYS_ALIBI:
        raise ValueError(
            f"model: {name} ({text.model_type}) always uses ALiBi attention biases, which seqpar does not support "
            "(the SP ops add no position bias); use a model with rotary or learned positions"
        )
    for prefix, sub in sub_configs:
        for field in ATTENTION_DROPOUT_FIELDS:
            value = getattr(sub, field, None) if not isinstance(sub, dict) else sub.get(field)
            if value:
                raise ValueError(
                    f"model: {name} has attention dropout config.{prefix}{field}={value}, which the SP ops do not "
                    f"implement; set config.{prefix}{field}=0 before building the model"
                )
    if not any(_uses_attention_interface(m) or calls_sdpa(m) or adapter_for(m) is not None
               for m in model.modules()):
        raise ValueError(
            f"model: {name} has no attention layer that reaches seqpar (no module uses transformers' attention "
            "interface or scaled_dot_product_attention, and none has an adapter); seqpar parallelizes attention, "
            "and a state-space (Mamba-style) or recurrent model would run on each rank's local tokens only"
        )


def _forward_mentions(module: torch.nn.Module, name: str) -> bool:
    """Whether the source of the module's own forward mentions ``name`` (a static check; False without source)."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return name in source


def _uses_attention_interface(module: torch.nn.Module) -> bool:
    """Whether the module's forward dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS`` (static)."""
    return _forward_mentions(module, "ALL_ATTENTION_FUNCTIONS")


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
        out = sp_softmax_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=bool(a.get("is_causal", False)),
            scale=a.get("scale"),
        )
        return out.transpose(1, 2)


def calls_sdpa(module: torch.nn.Module) -> bool:
    """Whether the module's own forward source mentions scaled_dot_product_attention (a static check)."""
    return _forward_mentions(module, "scaled_dot_product_attention")


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
    # float32 decays (the ops' state precision), float64 for a float64 model
    log_decay = -module.slope_rate.reshape(h).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    out = sp_linear_attention(q, k, v, log_decay=log_decay, scale=1.0).to(hidden_states.dtype)
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

"""Spec provider: GPT layer and decoder-block specs with Lighthouse core attention.

The specs start from Megatron-Core's own (``get_gpt_layer_with_transformer_engine_spec`` /
``get_gpt_layer_local_spec`` for one layer, ``get_gpt_decoder_layer_specs`` for a block, so dense / MoE layers
and the rest follow the config exactly as in ``get_gpt_decoder_block_spec``) and replace only
``self_attention.submodules.core_attention``:

- dense layers keep a plain core attention: ``TEDotProductAttention`` (TE) or
  :class:`~megatron_lighthouse.sdpa_core_attention.SDPACoreAttention` (local; Megatron's local
  ``DotProductAttention`` can do neither long sequences nor context parallelism);
- Lighthouse layers get :class:`~megatron_lighthouse.core_attention.LighthouseCoreAttention` with that same
  core attention as its inner one.

Nothing is built at import: every spec is built when one of these functions is called. Megatron-LM's unpatched
``pretrain_gpt.py --spec`` takes ready-made specs from :mod:`megatron_lighthouse.env_spec` instead. Lighthouse
core attentions keep the layers of ``dense_layers`` dense by their global layer number, so pipeline and virtual
pipeline stages need nothing more.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, List, Optional, Union

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from .config import LighthouseConfig
from .core_attention import LighthouseCoreAttention, LighthouseCoreAttentionSubmodules
from .sdpa_core_attention import SDPACoreAttention
from .self_attention import LighthouseSelfAttention
from .transformer_config import resolve_lighthouse

__all__ = [
    "get_gpt_layer_dense_spec",
    "get_gpt_layer_with_lighthouse_spec",
    "get_gpt_decoder_block_with_lighthouse_spec",
    "get_gpt_decoder_block_dense_spec",
]


#: The local specs' core attention (Megatron's local ``DotProductAttention`` has neither long sequences nor CP).
SDPA_CORE_ATTENTION = ModuleSpec(module=SDPACoreAttention)


def _call_accepted(fn: Callable, **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments its signature accepts (signatures differ across megatron-core)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _call_layer_spec(fn: Callable, options: dict, follows_config: tuple = ()) -> ModuleSpec:
    """Megatron's layer spec function ``fn`` with a caller's ``options``. ``ValueError`` naming an option that is
    no option of ``fn`` nor of Megatron's layer specs in any version (:data:`LAYER_SPEC_ARGS`: a misspelt
    ``qk_layernrom=True`` would vanish), or an option of another version, or of the other variant, given a value
    other than "off" (``None`` / ``False``), which this ``fn`` cannot honour. ``follows_config``: options ``fn``
    reads from the ``TransformerConfig`` instead (the TE layers' ``normalization``), passed over."""
    params = inspect.signature(fn).parameters
    unknown = sorted(k for k in options if k not in params and k not in LAYER_SPEC_ARGS)
    if unknown:
        raise ValueError(f"{', '.join(f'{k}={options[k]!r}' for k in unknown)}: not an option of Megatron's "
                         f"{fn.__name__} (nor of this package's spec functions); its options: "
                         f"{', '.join(params)}")
    unsupported = sorted(k for k, v in options.items()
                         if k not in params and k not in follows_config and v is not None and v is not False)
    if unsupported:
        raise ValueError(f"{', '.join(f'{k}={options[k]!r}' for k in unsupported)}: not an option of Megatron's "
                         f"{fn.__name__} in this megatron-core; its options: {', '.join(params)}")
    return fn(**{k: v for k, v in options.items() if k in params})


def _check_config(config: Any, what: str, optional: bool = False) -> None:
    """``ValueError`` unless ``config`` is a Megatron-Core ``TransformerConfig`` (or ``None`` when ``optional``)."""
    if not (isinstance(config, TransformerConfig) or optional and config is None):
        raise ValueError(f"{what}: config of type {type(config).__name__}: must be a megatron.core TransformerConfig "
                         f"(e.g. LighthouseTransformerConfig){' or None' if optional else ''}")


def _check_lighthouse_layers(config: TransformerConfig, lighthouse: LighthouseConfig) -> None:
    """``ValueError`` when ``lighthouse.dense_layers`` keeps every one of ``config.num_layers`` layers dense (the
    default keeps the first two and the last two: a model of 4 layers or fewer would have no Lighthouse layer)."""
    if len(lighthouse.dense_layer_set(config.num_layers)) == config.num_layers:
        raise ValueError(f"lighthouse.dense_layers={lighthouse.dense_layers} keeps all {config.num_layers} layers "
                         f"(config.num_layers) dense: no layer would run Lighthouse; give LighthouseConfig("
                         f"dense_layers=...) fewer layers (the default keeps the first two and the last two), or "
                         f"build the dense model with get_gpt_decoder_block_dense_spec")


def _attention_submodules(layer_spec: ModuleSpec):
    """``layer_spec.submodules.self_attention.submodules`` (the ``SelfAttentionSubmodules``)."""
    return layer_spec.submodules.self_attention.submodules


def replace_core_attention(layer_spec: ModuleSpec, core_attention: Union[ModuleSpec, type]) -> ModuleSpec:
    """A copy of ``layer_spec`` with ``core_attention`` as its self-attention core; the rest is shared (copied
    along that path only, so specs holding unpicklable entries are fine)."""
    layer = copy.copy(layer_spec)
    layer.submodules = copy.copy(layer_spec.submodules)
    attention = layer.submodules.self_attention = copy.copy(layer_spec.submodules.self_attention)
    attention.submodules = copy.copy(attention.submodules)
    attention.submodules.core_attention = core_attention
    return layer


def _check_transformer_engine(use_transformer_engine: bool) -> None:
    """``ValueError`` unless ``use_transformer_engine`` is a bool (a string such as ``"no"`` would choose TE);
    ``ImportError`` naming the setting when the TE variant is asked for without TransformerEngine (Megatron's TE spec
    functions would fail deep inside with a ``NameError``)."""
    if not isinstance(use_transformer_engine, bool):
        raise ValueError(f"use_transformer_engine={use_transformer_engine!r}: must be True or False")
    if use_transformer_engine and not have_transformer_engine():
        raise ImportError("use_transformer_engine=True needs TransformerEngine (transformer_engine[pytorch]), which "
                          "is not importable here: install it, or pass use_transformer_engine=False for the local "
                          "spec (SDPACoreAttention inner attention)")


def get_gpt_layer_dense_spec(*, use_transformer_engine: bool = True, **kwargs: Any) -> ModuleSpec:
    """Megatron's GPT layer spec (TE or local) with a long-sequence core attention: ``TEDotProductAttention``
    (TE, unchanged) or :class:`SDPACoreAttention` (local). ``kwargs`` go to Megatron's spec function
    (``num_experts``, ``qk_layernorm``, ``normalization`` (local; the TE layers follow ``config.normalization``),
    ...); one that function does not take is a ``ValueError`` naming it (see :func:`_call_layer_spec`).
    Multi-latent attention is not supported."""
    if kwargs.get("multi_latent_attention"):
        raise ValueError("multi_latent_attention=True: Lighthouse specs support standard (GQA/MHA) self-attention only")
    _check_transformer_engine(use_transformer_engine)
    if use_transformer_engine:
        spec = _call_layer_spec(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec, kwargs,
                                follows_config=("normalization",))
    else:
        spec = _call_layer_spec(gpt_layer_specs.get_gpt_layer_local_spec, kwargs)
        spec = replace_core_attention(spec, SDPA_CORE_ATTENTION)
    return spec


def _with_lighthouse(dense_spec: ModuleSpec, lighthouse: Optional[LighthouseConfig], **params: Any) -> ModuleSpec:
    """``dense_spec`` with its core attention wrapped in :class:`LighthouseCoreAttention` (``params``: more of its
    arguments), inside :class:`LighthouseSelfAttention` (so the core attention can place RoPE,
    ``LighthouseConfig.rope``)."""
    module = dense_spec.submodules.self_attention.module
    if module is not SelfAttention:
        raise ValueError(f"self_attention module {getattr(module, '__name__', module)!r}: Lighthouse layers are "
                         f"built on Megatron's SelfAttention")
    spec = replace_core_attention(dense_spec, ModuleSpec(
        module=LighthouseCoreAttention,
        params={**params, **({} if lighthouse is None else {"lighthouse": lighthouse})},
        submodules=LighthouseCoreAttentionSubmodules(core_attention=_attention_submodules(dense_spec).core_attention),
    ))
    spec.submodules.self_attention.module = LighthouseSelfAttention
    return spec


def get_gpt_layer_with_lighthouse_spec(
    config: Optional[TransformerConfig] = None,
    lighthouse: Optional[LighthouseConfig] = None,
    *,
    use_transformer_engine: bool = True,
    **kwargs: Any,
) -> ModuleSpec:
    """GPT layer spec whose core attention is :class:`LighthouseCoreAttention` around the stock one.

    Args:
        config: optional, a ``TransformerConfig``; its ``lighthouse`` field (:class:`LighthouseTransformerConfig`)
            supplies the settings when ``lighthouse`` is not given. Without either, the layers read
            ``config.lighthouse`` when built. Given, its ``num_layers`` is checked against ``dense_layers``.
        lighthouse: the settings (a :class:`LighthouseConfig`), carried in the spec.
        use_transformer_engine: TE variant (inner ``TEDotProductAttention``) or local (inner ``SDPACoreAttention``).
        kwargs: forwarded to Megatron's layer spec function (see :func:`get_gpt_layer_dense_spec`).
    Layers listed in ``lighthouse.dense_layers`` (by global layer number) stay dense when built from this spec; a
    ``config`` whose every layer they list is refused (no layer would run Lighthouse).
    """
    _check_config(config, "get_gpt_layer_with_lighthouse_spec", optional=True)
    if lighthouse is None and config is not None:
        lighthouse = getattr(config, "lighthouse", None)
    if lighthouse is not None:
        lighthouse = resolve_lighthouse(config, lighthouse)
        if config is not None:
            _check_lighthouse_layers(config, lighthouse)
    return _with_lighthouse(get_gpt_layer_dense_spec(use_transformer_engine=use_transformer_engine, **kwargs),
                            lighthouse)


def _block_norm(use_transformer_engine: bool):
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return gpt_layer_specs.LNImpl


def _stage_layer_specs(config: TransformerConfig, specs: List[ModuleSpec], vp_stage: Optional[int],
                       pp_rank: Optional[int]) -> List[ModuleSpec]:
    """The entries of ``specs`` (one per global layer) built by this pipeline (and virtual) stage."""
    _check_stage(config, vp_stage, pp_rank)
    stage = {"vp_stage": vp_stage, "pp_rank": pp_rank}
    layout = getattr(config, "pipeline_model_parallel_layout", None)
    if layout is not None:
        from megatron.core.transformer.enums import LayerType

        ids = _call_accepted(layout.get_layer_id_list, layer_type=LayerType.decoder, **stage)
        return [specs[i] for i in ids]
    offset = _call_accepted(get_transformer_layer_offset, config=config, **stage)
    count = _call_accepted(get_num_layers_to_build, config=config, **stage)
    return specs[offset: offset + count]


def _check_stage(config: TransformerConfig, vp_stage: Optional[int], pp_rank: Optional[int]) -> None:
    """``ValueError`` unless ``vp_stage`` is ``None`` or a virtual stage of ``config`` (``0`` to
    ``virtual_pipeline_model_parallel_size - 1``; ``0`` alone without virtual pipelining) and ``pp_rank`` is ``None``
    or a pipeline rank (``0`` to ``pipeline_model_parallel_size - 1``): Megatron ignores a ``vp_stage`` without
    virtual pipelining and builds no layers for a rank past the last."""
    for name, value, size, field in (
            ("vp_stage", vp_stage, getattr(config, "virtual_pipeline_model_parallel_size", None) or 1,
             "virtual_pipeline_model_parallel_size"),
            ("pp_rank", pp_rank, getattr(config, "pipeline_model_parallel_size", None) or 1,
             "pipeline_model_parallel_size")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size):
            raise ValueError(f"{name}={value!r}: must be None or an int in [0, {size}) (config.{field}="
                             f"{getattr(config, field, None)!r})")


#: The normalizations Megatron's layer specs build (``normalization``; ``None``: the config's).
NORMALIZATIONS = (None, "LayerNorm", "RMSNorm")


def check_normalization(normalization: Optional[str]) -> None:
    """``ValueError`` unless ``normalization`` is one of :data:`NORMALIZATIONS` (Megatron's local specs would build a
    LayerNorm for any other string, without a word)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: must be one of {NORMALIZATIONS} (None: "
                         f"config.normalization)")


#: Megatron layer-spec option -> the ``TransformerConfig`` field Megatron's decoder-block spec reads instead.
_BLOCK_CONFIG_FIELDS = {
    "num_experts": "num_moe_experts",
    "moe_grouped_gemm": "moe_grouped_gemm",
    "qk_layernorm": "qk_layernorm",
    "multi_latent_attention": "multi_latent_attention",
    "moe_use_legacy_grouped_gemm": "moe_use_legacy_grouped_gemm",
}


def _check_block_options(config: TransformerConfig, options: dict) -> None:
    """Layer-spec options given to a block spec must agree with ``config``, which is what the block reads."""
    for name, value in options.items():
        field = _BLOCK_CONFIG_FIELDS.get(name)
        if field is None:
            raise ValueError(
                f"{name}={value!r}: not a decoder-block spec option (the block spec takes normalization and "
                f"qk_l2_norm; everything else comes from the config, as in Megatron's get_gpt_decoder_block_spec)"
            )
        current = getattr(config, field, None)
        if (value or None) != (current or None):
            raise ValueError(
                f"{name}={value!r} disagrees with config.{field}={current!r}: the block spec reads config.{field} "
                f"(as Megatron's get_gpt_decoder_block_spec does); set it on the config"
            )


def _block_spec(config: TransformerConfig, lighthouse: Optional[LighthouseConfig], use_transformer_engine: bool,
                vp_stage: Optional[int], pp_rank: Optional[int], normalization: Optional[str], qk_l2_norm: bool,
                options: dict) -> TransformerBlockSubmodules:
    """Megatron's own per-layer GPT specs (``get_gpt_decoder_layer_specs``: dense / MoE layers from the config),
    core attention made long-sequence capable (local: :class:`SDPACoreAttention`) and, for the layers not in
    ``lighthouse.dense_layers``, wrapped in :class:`LighthouseCoreAttention`; then sliced to this stage."""
    _check_config(config, "the decoder-block spec")
    check_normalization(normalization)
    if not isinstance(qk_l2_norm, bool):
        raise ValueError(f"qk_l2_norm={qk_l2_norm!r}: must be True or False")
    if getattr(config, "multi_latent_attention", False):
        raise ValueError("config.multi_latent_attention=True: Lighthouse specs support standard (GQA/MHA) "
                         "self-attention only")
    if getattr(config, "experimental_attention_variant", None) is not None:
        raise ValueError(f"config.experimental_attention_variant={config.experimental_attention_variant!r}: "
                         f"Lighthouse replaces the core attention of standard self-attention layers only")
    _check_block_options(config, options)
    _check_transformer_engine(use_transformer_engine)
    megatron_specs = _call_accepted(gpt_layer_specs.get_gpt_decoder_layer_specs, config=config,
                                    use_transformer_engine=use_transformer_engine, normalization=normalization,
                                    qk_l2_norm=qk_l2_norm)
    if lighthouse is not None:
        _check_lighthouse_layers(config, lighthouse)
    dense_set = lighthouse.dense_layer_set(config.num_layers) if lighthouse is not None else range(config.num_layers)
    built = {}  # Megatron shares one spec object between layers of a kind: convert each kind once

    def convert(spec: ModuleSpec, lighthouse_layer: bool) -> ModuleSpec:
        key = (id(spec), lighthouse_layer)
        if key not in built:
            dense = spec if use_transformer_engine else replace_core_attention(spec, SDPA_CORE_ATTENTION)
            built[key] = _with_lighthouse(dense, lighthouse) if lighthouse_layer else dense
        return built[key]

    specs = [convert(spec, i not in dense_set) for i, spec in enumerate(megatron_specs)]
    return TransformerBlockSubmodules(
        layer_specs=_stage_layer_specs(config, specs, vp_stage, pp_rank),
        layer_norm=_block_norm(use_transformer_engine),
    )


def get_gpt_decoder_block_with_lighthouse_spec(
    config: TransformerConfig,
    lighthouse: Optional[LighthouseConfig] = None,
    *,
    use_transformer_engine: bool = True,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
    **options: Any,
) -> TransformerBlockSubmodules:
    """Decoder block spec for this pipeline stage, mirroring Megatron's ``get_gpt_decoder_block_spec``:
    ``lighthouse.dense_layers`` (0-based global layer indices, negative from the end) keep Megatron's dense
    layer spec, every other layer gets :class:`LighthouseCoreAttention` around the same core attention.

    ``lighthouse`` defaults to ``config.lighthouse``. As in Megatron, dense vs MoE layers, qk-layernorm and the
    rest come from ``config`` (``moe_layer_freq``, ``num_moe_experts``, ...); ``normalization`` and ``qk_l2_norm``
    go to Megatron's layer specs; ``vp_stage`` / ``pp_rank`` select the stage (pipeline layout honoured).
    ``options`` may repeat Megatron-LM's layer-spec options (``num_experts``, ``qk_layernorm``, ...): they must
    agree with the config. Multi-latent attention is not supported. ``ValueError`` for a ``config`` that is no
    ``TransformerConfig``, a stage it does not have, and ``dense_layers`` that keep every layer dense.
    """
    _check_config(config, "get_gpt_decoder_block_with_lighthouse_spec")
    lighthouse = resolve_lighthouse(config, lighthouse)
    return _block_spec(config, lighthouse, use_transformer_engine, vp_stage, pp_rank, normalization, qk_l2_norm,
                       options)


def get_gpt_decoder_block_dense_spec(
    config: TransformerConfig,
    *,
    use_transformer_engine: bool = True,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
    **options: Any,
) -> TransformerBlockSubmodules:
    """The dense counterpart of :func:`get_gpt_decoder_block_with_lighthouse_spec` (same arguments, same
    state-dict keys): with TE exactly Megatron's ``get_gpt_decoder_block_spec``; local, with
    :class:`SDPACoreAttention` as the core attention. The baseline, and the spec to fine-tune or serve a
    Lighthouse-trained checkpoint with."""
    return _block_spec(config, None, use_transformer_engine, vp_stage, pp_rank, normalization, qk_l2_norm,
                       options)


#: Megatron-LM arguments forwarded to Megatron's layer spec functions (across megatron-core versions: one this
#: version's function does not take passes when it is off, ``None`` or ``False``, see :func:`_call_layer_spec`).
LAYER_SPEC_ARGS = ("num_experts", "moe_grouped_gemm", "qk_layernorm", "multi_latent_attention", "qk_l2_norm",
                   "moe_use_legacy_grouped_gemm", "normalization")


def layer_spec_kwargs(args: Any) -> dict:
    """The layer-spec options present on a Megatron-LM argument namespace."""
    return {name: getattr(args, name) for name in LAYER_SPEC_ARGS if hasattr(args, name)}


def have_transformer_engine() -> bool:
    return bool(getattr(gpt_layer_specs, "HAVE_TE", False))

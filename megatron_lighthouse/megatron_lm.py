"""The package side of the Megatron-LM hook (``pretrain_gpt.py``, ``pretrain_hybrid.py``): flags, validation, spec
choice, two-stage switch.

The patch in ``patches/`` wires three calls into each of Megatron-LM's ``pretrain_gpt.py`` and
``pretrain_hybrid.py`` and nothing else:

1. arguments: ``parse_and_validate_args(extra_args_provider=lighthouse_args_provider(...))`` adds
   ``--lighthouse``, ``--lighthouse-topk``, ``--lighthouse-pooling-factor``, ``--lighthouse-levels``,
   ``--lighthouse-dense-layers``, ``--lighthouse-rope``, ``--lighthouse-dense-from-iteration``
   (:func:`add_lighthouse_args`) and the GPU-monitor flags after the provider Megatron-LM already passes (ModelOpt's);
2. start-up: ``start_lighthouse(args, model_cfg, printer=print_rank_0)`` once the model config exists: builds the
   :class:`LighthouseConfig` once and checks it against ``--seq-length``, ``--num-layers`` (a hybrid model's
   ``--hybrid-layer-pattern``, whose attention layers ``--lighthouse-dense-layers`` count),
   ``--context-parallel-size`` and the Megatron-LM flags that cannot work with it (:func:`validate_lighthouse_args`),
   prints the subsequence length, the attention-FLOP saving and the Lighthouse layers (:func:`lighthouse_summary`),
   makes the model config build the Lighthouse model (a GPT's decoder block spec per (virtual) pipeline stage, a
   hybrid model's stack spec), and registers the GPU monitor;
3. training loop: ``maybe_switch_to_dense(model, args)`` at the top of ``forward_step`` flips the Lighthouse
   layers to dense attention from ``--lighthouse-dense-from-iteration`` on, in the same run or after resuming from
   a checkpoint (nothing is rebuilt; parameters, optimizer state and checkpoint format are unchanged).

Importing this module does not import megatron-core; the spec modules are imported on first use.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import importlib.util
import logging
from typing import Any, Callable, Mapping, Optional, Tuple

from .config import ROPE_PLACEMENTS, LighthouseConfig
from .hybrid_pattern import hybrid_attention_layers
from .monitor.config import add_monitor_args, config_from_args
from .schedule import LighthouseSchedule, Model, lighthouse_modules, set_lighthouse_enabled

logger = logging.getLogger(__name__)

__all__ = [
    "add_lighthouse_args",
    "lighthouse_args_provider",
    "start_lighthouse",
    "lighthouse_config_from_args",
    "validate_lighthouse_args",
    "check_lighthouse_against_args",
    "lighthouse_block_spec_from_args",
    "lighthouse_hybrid_stack_spec_from_args",
    "lighthouse_schedule_from_args",
    "maybe_switch_to_dense",
    "lighthouse_summary",
]

_DEFAULTS = LighthouseConfig()

#: ``LighthouseConfig`` field -> (command-line flag, ``args`` attribute).
_FLAGS = {
    "topk": ("--lighthouse-topk", "lighthouse_topk"),
    "pooling_factor": ("--lighthouse-pooling-factor", "lighthouse_pooling_factor"),
    "levels": ("--lighthouse-levels", "lighthouse_levels"),
    "dense_layers": ("--lighthouse-dense-layers", "lighthouse_dense_layers"),
    "rope": ("--lighthouse-rope", "lighthouse_rope"),
}


def _shown(field: str, value: Any) -> str:
    """A setting's value as its flag / variable spells it: ``dense_layers`` comma-separated."""
    return ",".join(map(str, value)) if field == "dense_layers" else str(value)


def _int_list(text: str) -> Tuple[int, ...]:
    """argparse type: ``"0,1,-2,-1"`` -> ``(0, 1, -2, -1)``; ``""`` -> ``()`` (no dense layers)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return tuple(int(item) for item in items)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be comma-separated ints (0-based layer indices, negative from the end), e.g. 0,1,-2,-1"
        ) from None


def _iteration(text: str) -> int:
    """argparse type: an iteration number, an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an int >= 0 (the first dense iteration)")
    return value


def add_lighthouse_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the Lighthouse flags (and :func:`~megatron_lighthouse.monitor.config.add_monitor_args`) to ``parser``
    and return it: Megatron-LM's ``extra_args_provider``."""
    group = parser.add_argument_group("lighthouse")
    group.add_argument("--lighthouse", action="store_true",
                       help="Use the Lighthouse decoder block spec (selection-based hierarchical attention).")
    group.add_argument("--lighthouse-topk", type=int, default=_DEFAULTS.topk,
                       help=f"Global selection budget k, a multiple of 128 (default: {_DEFAULTS.topk}).")
    group.add_argument("--lighthouse-pooling-factor", type=int, default=_DEFAULTS.pooling_factor,
                       help=f"Pooling factor p, a power of two in [2, 64] (default: {_DEFAULTS.pooling_factor}).")
    group.add_argument("--lighthouse-levels", type=int, default=_DEFAULTS.levels,
                       help=f"Pyramid levels L >= 2, level 0 being the tokens (default: {_DEFAULTS.levels}).")
    group.add_argument("--lighthouse-dense-layers", type=_int_list, default=_DEFAULTS.dense_layers,
                       help="Attention layers kept dense, comma-separated 0-based indices, negative from the end; "
                            "empty for none (default: 0,1,-2,-1). They count the layers of a GPT model and the "
                            "attention layers ('*') of --hybrid-layer-pattern in a hybrid one.")
    group.add_argument("--lighthouse-rope", choices=ROPE_PLACEMENTS, default=_DEFAULTS.rope,
                       help="Where Lighthouse layers apply RoPE: 'entries' rotates each selected entry at its last "
                            "token's position (the published model); 'tokens' rotates tokens before pooling "
                            f"(default: {_DEFAULTS.rope}).")
    group.add_argument("--lighthouse-dense-from-iteration", type=_iteration, default=None,
                       help="Two-stage recipe: switch every Lighthouse layer to dense attention from this iteration "
                            "on (same run or on resume); default: Lighthouse throughout.")
    add_monitor_args(parser)
    return parser


def lighthouse_args_provider(
    other: Optional[Callable[[argparse.ArgumentParser], argparse.ArgumentParser]] = None,
) -> Callable[[argparse.ArgumentParser], argparse.ArgumentParser]:
    """An ``extra_args_provider`` adding the Lighthouse flags after ``other``'s (e.g. ModelOpt's), if any."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        if other is not None:
            parser = other(parser)
        return add_lighthouse_args(parser)

    return provider


def lighthouse_config_from_args(args: Any) -> Optional[LighthouseConfig]:
    """:class:`LighthouseConfig` from the parsed flags, built once; ``None`` without ``--lighthouse``.

    ``ValueError`` names the offending flag, its value and the rule.
    """
    if not getattr(args, "lighthouse", False):
        return None
    values = {field: getattr(args, attr) for field, (_, attr) in _FLAGS.items()}
    try:
        return LighthouseConfig(**values)
    except ValueError as err:
        field = next((f for f in _FLAGS if f"LighthouseConfig.{f}=" in str(err)), None)
        if field is None:
            raise
        raise ValueError(f"{_FLAGS[field][0]} {_shown(field, values[field])}: {err}") from None


def _hybrid_pattern(args: Any) -> Optional[str]:
    """Megatron-LM's ``--hybrid-layer-pattern`` (``pretrain_hybrid.py``), ``None`` in a GPT run."""
    return getattr(args, "hybrid_layer_pattern", None) or None


def _cp_size(args: Any) -> int:
    return getattr(args, "context_parallel_size", None) or 1


def _chunks(args: Any) -> int:
    """Selection chunks per sequence: 1, or ``2 * W`` with context parallelism of size ``W`` (the load-balanced
    split gives each rank two chunks, each selecting ``topk / (2W)`` on its own)."""
    cp = _cp_size(args)
    return 1 if cp == 1 else 2 * cp


#: Megatron-LM flags (``args`` attribute, flag) that choose a layer spec of their own: ``--lighthouse`` replaces
#: the layer spec, so it cannot honour them. (Settings the Lighthouse spec cannot build, e.g. multi-latent
#: attention, are refused by :mod:`megatron_lighthouse.spec` when the model is built.)
_OTHER_SPEC_FLAGS = (("spec", "--spec"), ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path"))
#: ``--spec`` values that name Megatron's own hybrid stack spec (the migration guide passes one to
#: ``pretrain_hybrid.py``): a hybrid run with ``--lighthouse`` accepts them, as its spec is that one with Lighthouse.
MEGATRON_HYBRID_STACK_SPECS = (("megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"),
                               ("megatron.core.models.hybrid.hybrid_layer_specs", "mamba_stack_spec"))

#: Megatron-LM flags (``args`` attribute, flag, what it does, the fix) that make the data loader cut each sequence
#: into its documents, while Lighthouse selects over a sequence as one causal document (``{switch}``: what turned
#: Lighthouse on).
_ACROSS_DOCUMENTS = "drop it (documents then attend to the earlier ones of their sequence, Megatron-LM's default)"
_DOCUMENT_FLAGS = (
    ("reset_attention_mask", "--reset-attention-mask",
     "a document mask (no attention across end-of-document tokens), which Lighthouse layers refuse at run time, "
     "and without the data loader's mask (--no-create-attention-mask-in-dataloader, which {switch} needs) "
     "Megatron-LM drops it silently", _ACROSS_DOCUMENTS),
    ("reset_position_ids", "--reset-position-ids",
     "positions restarting at each end-of-document token, each document its own sequence, while Lighthouse pools, "
     "selects and rotates entries at their positions in the whole sequence", _ACROSS_DOCUMENTS),
    ("sft", "--sft",
     "packed (THD) batches of documents with cu_seqlens, which Lighthouse layers refuse at run time",
     "fine-tune the dense model instead (without {switch}: a Lighthouse checkpoint loads into it)"),
    ("dataloader_inter_document_masking", "--dataloader-inter-document-masking",
     "packed (THD) batches with attention cut at document boundaries (cu_seqlens), which Lighthouse layers refuse "
     "at run time", _ACROSS_DOCUMENTS),
)


def _check_megatron_flags(args: Any, switch: str) -> None:
    """Refuse, at start-up, the Megatron-LM settings that cannot work with Lighthouse at ``--seq-length``
    (``switch``: what turned it on, see :func:`check_lighthouse_against_args`).

    Each ``ValueError`` names the flag, the rule and the fix:

    - flags that pick another layer spec than ``switch`` (``--spec``, ``--heterogeneous-layers-config-path``;
      in a hybrid run Megatron's own ``hybrid_stack_spec`` is fine, :data:`MEGATRON_HYBRID_STACK_SPECS`);
    - the data loader's attention mask (Megatron-LM's default): ``[s, s]`` per sample, built in the data-loader
      workers;
    - flags that split a sequence into its documents (:data:`_DOCUMENT_FLAGS`: document masks, reset positions,
      packed THD batches), which Lighthouse layers refuse at run time or which would be dropped silently;
    - ``--multi-latent-attention`` (Lighthouse wraps standard self-attention only);
    - gradient-accumulation fusion (Megatron-LM's default) when Apex's ``fused_weight_gradient_mlp_cuda`` is
      missing, as with a TransformerEngine installed from the package registry: the output layer (and every local
      linear layer) would fail at the first iteration;
    - ``--transformer-impl local`` (whose own ``DotProductAttention`` the Lighthouse spec already replaces with the
      torch-SDPA core attention) with the persistent layer norm (Megatron-LM's default; the local RMSNorm is
      torch's);
    - with ``--context-parallel-size`` > 1: a ``--cp-comm-type`` TransformerEngine does not know, and attention
      dropout (Megatron-LM's default 0.1) with the local implementation, which has none under context parallelism;
    - in a hybrid run (``--hybrid-layer-pattern``) with ``--transformer-impl local``: layer families the local
      hybrid stack spec has no module for (:data:`~megatron_lighthouse.hybrid_spec.LOCAL_UNAVAILABLE`).
    """
    pattern = _hybrid_pattern(args)
    for attr, flag in _OTHER_SPEC_FLAGS:
        value = getattr(args, attr, None)
        shown = " ".join(value) if isinstance(value, (list, tuple)) else value
        megatrons = pattern is not None and isinstance(value, (list, tuple)) and tuple(value) in MEGATRON_HYBRID_STACK_SPECS
        if value and f"{flag} {shown}" != switch and not megatrons:
            raise ValueError(f"{switch} with {flag} {shown}: {switch} builds the decoder layer specs itself; drop one "
                             "of the two")
    seq = args.seq_length
    if getattr(args, "create_attention_mask_in_dataloader", False):
        raise ValueError(f"--create-attention-mask-in-dataloader (Megatron-LM's default) with {switch}: the data "
                         f"loader would build a [1, {seq}, {seq}] boolean mask for every sample, {_size(seq * seq)} "
                         f"each at --seq-length {seq} (from a float32 [s, s] tensor, {_size(4 * seq * seq)}, in the "
                         f"data-loader workers), which Lighthouse layers and the stock causal kernels never read; "
                         f"pass --no-create-attention-mask-in-dataloader")
    for attr, flag, what, fix in _DOCUMENT_FLAGS:
        if getattr(args, attr, False):
            raise ValueError(f"{flag} with {switch}: {what.format(switch=switch)}; Lighthouse selects over each "
                             f"sequence as one causal document; {fix.format(switch=switch)}")
    if getattr(args, "multi_latent_attention", False):
        raise ValueError(f"--multi-latent-attention with {switch}: Lighthouse layers wrap the core attention of "
                         "standard (multi-head or grouped-query) self-attention only; drop one of the two")
    if getattr(args, "gradient_accumulation_fusion", False) and \
            importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None:
        raise ValueError("gradient-accumulation fusion (Megatron-LM's default) without Apex: Megatron's linear layers "
                         "(the output layer with every --transformer-impl) need Apex's fused_weight_gradient_mlp_cuda "
                         "extension for it, which is not importable here (TransformerEngine from the package "
                         "registry comes without Apex); pass --no-gradient-accumulation-fusion")
    local = getattr(args, "transformer_impl", "transformer_engine") == "local"
    if local:
        _check_local_implementation(args)
        if pattern is not None:
            _check_local_hybrid_pattern(pattern)
    cp = _cp_size(args)
    if cp > 1:
        _check_context_parallel(args, cp, local, switch)


def _check_local_implementation(args: Any) -> None:
    """``--transformer-impl local``: the persistent layer norm, which its local layers cannot build without Apex."""
    norm = getattr(args, "normalization", "LayerNorm")
    if not getattr(args, "no_persist_layer_norm", True) and (
            norm != "LayerNorm" or importlib.util.find_spec("apex") is None):
        why = (f"the local layers' {norm} is torch's" if norm != "LayerNorm" else
               "without Apex the local layers' LayerNorm is torch's")
        raise ValueError(f"--transformer-impl local with the persistent layer norm (Megatron-LM's default): {why}, "
                         f"which refuses it (\"persist_layer_norm not supported by torch LayerNorm\" when the model is "
                         f"built); pass --no-persist-layer-norm")


def _check_local_hybrid_pattern(pattern: str) -> None:
    """``--transformer-impl local`` in a hybrid run: every layer family of ``pattern`` must be one the local hybrid
    stack spec builds (the model build would refuse the others, later)."""
    from .hybrid_spec import LOCAL_UNAVAILABLE

    for symbol, (_, family, needs) in LOCAL_UNAVAILABLE.items():
        if symbol in pattern:
            raise ValueError(f"--transformer-impl local with --hybrid-layer-pattern {pattern}: its '{symbol}' ({family}) "
                             f"layers are not in the local hybrid stack spec, which builds '*' attention, '-' MLP and "
                             f"'E' MoE layers only; {needs}")


def _check_context_parallel(args: Any, cp: int, local: bool, switch: str) -> None:
    """``--context-parallel-size`` > 1: the communication type and (local) attention dropout."""
    from .causal_core_attention import check_cp_comm_type

    comm = getattr(args, "cp_comm_type", None)
    shown = " ".join(comm) if isinstance(comm, (list, tuple)) else comm
    check_cp_comm_type(comm, cp, f"--cp-comm-type {shown} with {switch}")
    dropout = getattr(args, "attention_dropout", 0.0) or 0.0
    if local and dropout > 0:
        raise ValueError(f"--attention-dropout {dropout} (Megatron-LM's default is 0.1) with --context-parallel-size "
                         f"{cp} and --transformer-impl local: the torch-SDPA core attention has no dropout under "
                         f"context parallelism; pass --attention-dropout 0")


def _size(num_bytes: float) -> str:
    """``17.2 GB`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.3g} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def validate_lighthouse_args(args: Any) -> Optional[LighthouseConfig]:
    """Build the :class:`LighthouseConfig` of the flags and check it against Megatron-LM's arguments
    (:func:`check_lighthouse_against_args`).

    Returns the config, ``None`` without ``--lighthouse``: then a Lighthouse setting flag other than its default,
    or ``--lighthouse-dense-from-iteration``, is refused (it would be ignored). With ``--lighthouse-monitor`` the
    monitor's flags are checked too (:func:`~megatron_lighthouse.monitor.config.config_from_args`), so a bad one
    stops the start-up, not the first iteration. ``ValueError`` names the flag.
    """
    if getattr(args, "lighthouse_monitor", False):
        config_from_args(args)
    cfg = lighthouse_config_from_args(args)
    if cfg is None:
        for field, (flag, attr) in _FLAGS.items():
            value = getattr(args, attr, getattr(_DEFAULTS, field))
            if value != getattr(_DEFAULTS, field):
                raise ValueError(f"{flag} {_shown(field, value)}: needs --lighthouse (without it every layer is dense "
                                 "and the Lighthouse settings are unused)")
        value = getattr(args, "lighthouse_dense_from_iteration", None)
        if value is not None:
            raise ValueError(f"--lighthouse-dense-from-iteration {value}: needs --lighthouse (without it every layer "
                             "is dense from the start)")
        return None
    check_lighthouse_against_args(cfg, args, "--lighthouse", {field: f"{flag} " for field, (flag, _) in _FLAGS.items()})
    return cfg


def check_lighthouse_against_args(lighthouse: LighthouseConfig, args: Any, switch: str,
                                  names: Mapping[str, str]) -> None:
    """Check ``lighthouse`` against Megatron-LM's parsed ``args``: ``--seq-length`` (split into the selection chunks
    of ``--context-parallel-size``), ``--num-layers`` (``dense_layers`` in range, at least one Lighthouse layer; in
    a hybrid run ``--hybrid-layer-pattern``, whose attention layers ``dense_layers`` count,
    :func:`~megatron_lighthouse.hybrid_pattern.hybrid_attention_layers`) and the Megatron-LM flags that cannot work
    with it (:func:`_check_megatron_flags`).

    Both routes into Megatron-LM share it: the patched hook (:func:`validate_lighthouse_args`) and
    ``--spec megatron_lighthouse.env_spec NAME`` (:mod:`megatron_lighthouse.env_spec`).

    Args:
        lighthouse: the settings.
        args: Megatron-LM's parsed arguments.
        switch: what turned Lighthouse on, as the messages name it: ``"--lighthouse"``, or the ``--spec`` flag with
            its values (that ``--spec`` is then not another layer spec).
        names: ``topk``, ``pooling_factor``, ``levels``, ``dense_layers`` -> how the messages name each, the value
            following: ``"--lighthouse-topk "`` or ``"LIGHTHOUSE_TOPK="``.

    ``ValueError`` names the setting (``names``), the Megatron-LM flag and the rule.
    """
    def setting(field: str) -> str:
        return names[field] + _shown(field, getattr(lighthouse, field))

    _check_megatron_flags(args, switch)
    cp = _cp_size(args)
    try:
        lighthouse.validate(args.seq_length, chunks=_chunks(args))
    except ValueError as err:
        where = "" if cp == 1 else f" with --context-parallel-size {cp} ({_chunks(args)} chunks)"
        raise ValueError(f"--seq-length {args.seq_length}{where} does not fit {setting('topk')} "
                         f"{setting('pooling_factor')} {setting('levels')}: {err}") from None
    pattern = _hybrid_pattern(args)
    if pattern is not None:  # dense_layers count the pattern's attention layers
        try:
            hybrid_attention_layers(pattern, lighthouse)
        except ValueError as err:
            raise ValueError(f"--hybrid-layer-pattern {pattern} with {setting('dense_layers')}: {err}") from None
        return
    try:
        dense = lighthouse.dense_layer_set(args.num_layers)
    except ValueError as err:
        raise ValueError(f"{setting('dense_layers')} with --num-layers {args.num_layers}: {err}") from None
    if len(dense) == args.num_layers:
        raise ValueError(f"{setting('dense_layers')} keeps all {args.num_layers} layers (--num-layers) dense: no "
                         "layer would run Lighthouse")


def lighthouse_block_spec_from_args(args: Any, lighthouse: Optional[LighthouseConfig], config: Any,
                                    vp_stage: Optional[int] = None):
    """Decoder block spec for this (virtual) pipeline stage: Lighthouse with the settings ``lighthouse``, dense for
    ``None``.

    ``config`` is Megatron's ``TransformerConfig``; TransformerEngine is used unless ``--transformer-impl local``;
    Megatron-LM's layer-spec options (``--qk-layernorm``, MoE, ...) come from ``args``. Returns Megatron's
    ``TransformerBlockSubmodules``.
    """
    from .spec import get_gpt_decoder_block_dense_spec, get_gpt_decoder_block_with_lighthouse_spec, layer_spec_kwargs

    use_te = getattr(args, "transformer_impl", "transformer_engine") == "transformer_engine"
    kwargs = dict(use_transformer_engine=use_te, vp_stage=vp_stage, **layer_spec_kwargs(args))
    if lighthouse is None:
        return get_gpt_decoder_block_dense_spec(config, **kwargs)
    return get_gpt_decoder_block_with_lighthouse_spec(config, lighthouse, **kwargs)


def lighthouse_hybrid_stack_spec_from_args(args: Any, lighthouse: Optional[LighthouseConfig]):
    """Hybrid stack spec (``pretrain_hybrid.py``) for ``--hybrid-layer-pattern``: Megatron's ``hybrid_stack_spec``
    (the local hybrid stack with ``--transformer-impl local``) with Lighthouse in its attention layers, the settings
    ``lighthouse``; dense for ``None``. One ``ModuleSpec`` for every (virtual) pipeline stage: the core attentions
    tell their attention layer by their global layer number. ``ValueError`` without a pattern (the deprecated ratio
    flags are not read)."""
    from .hybrid_spec import get_hybrid_stack_dense_spec, get_hybrid_stack_with_lighthouse_spec

    pattern = _hybrid_pattern(args)
    if pattern is None:
        raise ValueError("a hybrid model with Lighthouse needs --hybrid-layer-pattern (the deprecated "
                         "--hybrid-attention-ratio / --hybrid-mlp-ratio / --hybrid-override-pattern are not read)")
    use_te = getattr(args, "transformer_impl", "transformer_engine") == "transformer_engine"
    normalization = getattr(args, "normalization", None)
    if lighthouse is None:
        return get_hybrid_stack_dense_spec(use_transformer_engine=use_te, normalization=normalization)
    return get_hybrid_stack_with_lighthouse_spec(lighthouse, pattern, use_transformer_engine=use_te,
                                                 normalization=normalization)


def lighthouse_schedule_from_args(args: Any) -> LighthouseSchedule:
    """The schedule of ``--lighthouse-dense-from-iteration`` (Lighthouse throughout when unset)."""
    return LighthouseSchedule(getattr(args, "lighthouse_dense_from_iteration", None))


def maybe_switch_to_dense(model: Model, args: Any, iteration: Optional[int] = None) -> bool:
    """Apply ``--lighthouse-dense-from-iteration`` to ``model`` (a module or list of model chunks) at
    ``iteration``; call once per iteration (or micro-batch).

    ``iteration`` defaults to Megatron-LM's ``args.curr_iteration`` (set by the training loop), else
    ``args.iteration`` (the loaded checkpoint's, or 0; evaluation-only runs never set ``curr_iteration``).
    Returns ``True`` when this call moved Lighthouse layers to dense attention (logged once, with the layers).
    """
    if iteration is None:
        iteration = getattr(args, "curr_iteration", getattr(args, "iteration", 0))
    modules = lighthouse_modules(model)
    running = [m for m in modules if m.enabled]
    schedule = lighthouse_schedule_from_args(args)
    set_lighthouse_enabled(modules, schedule.enabled_at(iteration))
    moved = [m for m in running if not m.enabled]
    if moved:
        logger.info("Lighthouse: iteration %d >= --lighthouse-dense-from-iteration %d: %d Lighthouse layers "
                    "switched to dense attention (layers %s)", iteration, schedule.dense_from_iteration, len(moved),
                    ", ".join(str(m.layer_number) for m in moved))
    return bool(moved)


def _model_config_block_spec(args: Any, lighthouse: LighthouseConfig, model_config: Any,
                             vp_stage: Optional[int] = None):
    """``GPTModelConfig.transformer_layer_spec`` callable: the block spec of :func:`lighthouse_block_spec_from_args`
    for the ``TransformerConfig`` that Megatron-LM's model builder passes (inside ``model_config.transformer``)."""
    return lighthouse_block_spec_from_args(args, lighthouse, getattr(model_config, "transformer", model_config),
                                           vp_stage)


def _set_layer_spec(args: Any, lighthouse: LighthouseConfig, model_config: Any) -> None:
    """Make Megatron-LM's model config build the Lighthouse model: ``GPTModelConfig`` the decoder block spec per
    (virtual) pipeline stage, ``HybridModelConfig`` the hybrid stack spec (built here, once)."""
    fields = {f.name for f in dataclasses.fields(model_config)} if dataclasses.is_dataclass(model_config) else ()
    if "hybrid_stack_spec" in fields:
        model_config.hybrid_stack_spec = lighthouse_hybrid_stack_spec_from_args(args, lighthouse)
    elif "transformer_layer_spec" in fields:
        model_config.transformer_layer_spec = functools.partial(_model_config_block_spec, args, lighthouse)
    else:
        raise ValueError(f"--lighthouse: the model config {type(model_config).__name__} has neither a "
                         "transformer_layer_spec nor a hybrid_stack_spec field; this Megatron-LM does not build its "
                         "model through GPTModelConfig or HybridModelConfig (see patches/README.md for the commits the "
                         "hook is verified on)")


def lighthouse_summary(args: Any, lighthouse: Optional[LighthouseConfig], num_heads: int, head_dim: int) -> str:
    """One line: the subsequence length and the attention-FLOP ratio of a Lighthouse layer vs. dense at
    ``--seq-length`` (``num_heads`` heads of ``head_dim``), for the validated settings ``lighthouse``."""
    if lighthouse is None:
        return f"Lighthouse: off (dense attention at --seq-length {args.seq_length})"
    cost = lighthouse.attention_cost(args.seq_length, num_heads, head_dim, chunks=_chunks(args))
    pattern = _hybrid_pattern(args)
    if pattern is None:
        dense_layers = sorted(lighthouse.dense_layer_set(args.num_layers))
        layers = (f"{args.num_layers - len(dense_layers)}/{args.num_layers} layers Lighthouse, dense layers "
                  f"{dense_layers}")
    else:
        layers = f"--hybrid-layer-pattern {pattern}: {hybrid_attention_layers(pattern, lighthouse).describe()}"
    stage_two = args.lighthouse_dense_from_iteration
    return (f"Lighthouse: seq_length {args.seq_length} -> subsequence {cost['subsequence_length']} "
            f"(levels {lighthouse.levels}, pooling_factor {lighthouse.pooling_factor}, topk {lighthouse.topk}, "
            f"context_parallel {_cp_size(args)}); attention FLOPs per Lighthouse layer {cost['ratio']:.2%} of dense "
            f"({_saving(cost['ratio'])}); {layers}; "
            + ("Lighthouse throughout" if stage_two is None else f"dense from iteration {stage_two}"))


def _saving(ratio: float) -> str:
    if ratio < 1.0:
        return f"{1.0 / ratio:.1f}x fewer"
    return f"{ratio:.1f}x more: the subsequence is not shorter than the sequence, Lighthouse does not pay off here"


def _monitor_step_hook(args: Any) -> Callable[..., None]:
    """A global ``torch.optim`` step post-hook driving :class:`~megatron_lighthouse.monitor.GPUMonitor` once per
    training iteration.

    The optimizer step is the one point of a Megatron-LM iteration that every rank reaches after the
    pipeline schedule has finished, so the monitor's collective cannot interleave with pipeline
    send/receive. The monitor starts on the first step (after Megatron has set the device and process
    groups); several inner optimizers per iteration count once.
    """
    from .monitor import GPUMonitor

    state: dict = {"monitor": None, "iteration": None}

    def hook(optimizer: Any, hook_args: Any, hook_kwargs: Any) -> None:
        iteration = getattr(args, "curr_iteration", 0) + 1  # Megatron sets curr_iteration before the step
        if iteration == state["iteration"]:
            return
        state["iteration"] = iteration
        if state["monitor"] is None:
            state["monitor"] = GPUMonitor.from_args(args).start()
            atexit.register(state["monitor"].stop)
        state["monitor"].step(iteration)

    return hook


def start_lighthouse(args: Any, model_config: Any, printer: Optional[Callable[[str], None]] = None
                     ) -> Optional[LighthouseConfig]:
    """Megatron-LM start-up, once the model config exists (before ``pretrain``).

    Validates the flags (:func:`validate_lighthouse_args`; ``ValueError`` names the flag), reports the subsequence
    length and attention-FLOP saving through ``printer`` (e.g. Megatron-LM's ``print_rank_0``; default
    ``logging.info``), makes ``model_config`` (Megatron-LM's ``GPTModelConfig``) build the Lighthouse decoder block
    spec for each (virtual) pipeline stage with ``--lighthouse``, and with ``--lighthouse-monitor`` registers the
    per-iteration GPU monitor (see :func:`_monitor_step_hook`).

    Returns the :class:`LighthouseConfig` (``None`` without ``--lighthouse``).
    """
    cfg = validate_lighthouse_args(args)
    head_dim = getattr(args, "kv_channels", None) or args.hidden_size // args.num_attention_heads
    (printer or logger.info)(lighthouse_summary(args, cfg, args.num_attention_heads, head_dim))
    if cfg is not None:
        _set_layer_spec(args, cfg, model_config)
    if getattr(args, "lighthouse_monitor", False):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(_monitor_step_hook(args))
    return cfg

"""``megatron_lighthouse.megatron_lm``: the Megatron-LM flags, their validation, the spec choice and the switch."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import logging
import subprocess
import sys

import pytest

from megatron_lighthouse.config import LighthouseConfig
from megatron_lighthouse.megatron_lm import (
    add_lighthouse_args,
    lighthouse_args_provider,
    lighthouse_block_spec_from_args,
    lighthouse_config_from_args,
    lighthouse_schedule_from_args,
    lighthouse_summary,
    maybe_switch_to_dense,
    start_lighthouse,
    validate_lighthouse_args,
)

from megatron_utils import SEQ, init_megatron, tiny_gpt  # noqa: E402


def parse(*argv: str, seq_length: int = 524288, num_layers: int = 6, cp: int = 1) -> argparse.Namespace:
    """Parse ``argv`` with the Lighthouse flags, plus the Megatron-LM arguments they are checked against."""
    args = add_lighthouse_args(argparse.ArgumentParser(prog="pretrain_gpt.py")).parse_args(list(argv))
    args.seq_length, args.num_layers, args.context_parallel_size = seq_length, num_layers, cp
    args.transformer_impl = "local"
    return args


def parse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        parse(*argv)
    return capsys.readouterr().err


def test_import_does_not_import_megatron():
    code = ("import sys, megatron_lighthouse.megatron_lm; "
            "assert not any(m.startswith('megatron.core') for m in sys.modules), 'megatron.core imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_defaults():
    args = parse()
    assert args.lighthouse is False
    assert (args.lighthouse_topk, args.lighthouse_pooling_factor, args.lighthouse_levels) == (2048, 4, 3)
    assert args.lighthouse_dense_layers == (0, 1, -2, -1)
    assert args.lighthouse_rope == "entries"
    assert args.lighthouse_dense_from_iteration is None
    assert args.lighthouse_monitor is False  # the monitor flags come along
    assert lighthouse_config_from_args(args) is None
    assert validate_lighthouse_args(args) is None
    assert lighthouse_config_from_args(parse("--lighthouse")) == LighthouseConfig()


def test_every_flag_parses():
    args = parse("--lighthouse", "--lighthouse-topk", "1024", "--lighthouse-pooling-factor", "8",
                 "--lighthouse-levels", "2", "--lighthouse-dense-layers", "0, -1", "--lighthouse-rope", "tokens",
                 "--lighthouse-dense-from-iteration", "500", "--lighthouse-monitor",
                 "--lighthouse-monitor-interval", "0.5")
    assert lighthouse_config_from_args(args) == LighthouseConfig(levels=2, pooling_factor=8, topk=1024,
                                                                 dense_layers=(0, -1), rope="tokens")
    assert args.lighthouse_dense_from_iteration == 500
    assert args.lighthouse_monitor and args.lighthouse_monitor_interval == 0.5
    assert parse("--lighthouse-dense-layers", "").lighthouse_dense_layers == ()


def test_bad_values_rejected_by_argparse(capsys):
    err = parse_error(capsys, "--lighthouse-dense-layers", "0,x")
    assert "--lighthouse-dense-layers" in err and "'0,x'" in err and "comma-separated ints" in err
    err = parse_error(capsys, "--lighthouse-rope", "values")
    assert "--lighthouse-rope" in err and "'entries', 'tokens'" in err
    err = parse_error(capsys, "--lighthouse-dense-from-iteration", "-3")
    assert "--lighthouse-dense-from-iteration" in err and ">= 0" in err
    err = parse_error(capsys, "--lighthouse-topk", "many")
    assert "--lighthouse-topk" in err


@pytest.mark.parametrize("argv, flag", [
    (("--lighthouse-topk", "100"), "--lighthouse-topk 100: "),
    (("--lighthouse-pooling-factor", "3"), "--lighthouse-pooling-factor 3: "),
    (("--lighthouse-levels", "1"), "--lighthouse-levels 1: "),
])
def test_bad_settings_name_the_flag(argv, flag):
    with pytest.raises(ValueError) as err:
        lighthouse_config_from_args(parse("--lighthouse", *argv))
    assert str(err.value).startswith(flag)
    with pytest.raises(ValueError, match=flag):
        validate_lighthouse_args(parse("--lighthouse", *argv))


@pytest.mark.parametrize("argv, message", [
    (("--lighthouse-monitor-interval", "0"), "--lighthouse-monitor-interval 0.0: must be a number in (0, 3600]"),
    (("--lighthouse-monitor-step-threshold", "-1"),
     "--lighthouse-monitor-step-threshold -1.0: must be a finite number > 0"),
    (("--lighthouse-monitor-util-threshold", "0"), "--lighthouse-monitor-util-threshold 0.0: must be a number in (0, 100]"),
])
@pytest.mark.parametrize("lighthouse", [(), ("--lighthouse",)])
def test_bad_monitor_flags_stop_the_start_up(argv, message, lighthouse):
    """The monitor starts on the first optimizer step; its flags are checked with the others at start-up, with or
    without --lighthouse, and only when the monitor is on (they are unused otherwise)."""
    with pytest.raises(ValueError) as err:
        validate_lighthouse_args(parse(*lighthouse, "--lighthouse-monitor", *argv))
    assert str(err.value).startswith(message), str(err.value)
    validate_lighthouse_args(parse(*lighthouse, *argv))


def test_seq_length_that_does_not_fit():
    # topk 2048 -> 16 tiles, p**(L-1) = 16: the sequence must be a multiple of 256 and >= 32768.
    with pytest.raises(ValueError, match=r"--seq-length 100000 .*nearest valid lengths: \(99840, 100096\)"):
        validate_lighthouse_args(parse("--lighthouse", seq_length=100000))
    with pytest.raises(ValueError, match=r"--seq-length 16384 .*needs >= 128"):
        validate_lighthouse_args(parse("--lighthouse", seq_length=16384))
    assert validate_lighthouse_args(parse("--lighthouse", seq_length=32768)) == LighthouseConfig()


def test_context_parallel_validates_the_local_chunks():
    # CP 2: 4 chunks of 32768 tokens, each selecting 2048/4 = 512 (4 tiles): fits.
    assert validate_lighthouse_args(parse("--lighthouse", seq_length=131072, cp=2)) is not None
    # 4 chunks of 4096 tokens: 256 coarsest entries over 4 tiles, 64 per tile < 128.
    too_short = r"--seq-length 16384 with --context-parallel-size 2 \(4 chunks\).*needs >= 128"
    with pytest.raises(ValueError, match=too_short):
        validate_lighthouse_args(parse("--lighthouse", seq_length=16384, cp=2))
    # topk 256 fits one sequence of 131072 but cannot be split into 4 chunks of whole tiles.
    assert validate_lighthouse_args(parse("--lighthouse", "--lighthouse-topk", "256", seq_length=131072)) is not None
    with pytest.raises(ValueError, match=r"--context-parallel-size 2 .*topk must be a multiple of 512"):
        validate_lighthouse_args(parse("--lighthouse", "--lighthouse-topk", "256", seq_length=131072, cp=2))


def test_dense_layers_out_of_range():
    with pytest.raises(ValueError, match=r"--lighthouse-dense-layers 0,1,-2,-1 with --num-layers 1: .*entry 1"):
        validate_lighthouse_args(parse("--lighthouse", num_layers=1))
    with pytest.raises(ValueError, match=r"--lighthouse-dense-layers 6 with --num-layers 6"):
        validate_lighthouse_args(parse("--lighthouse", "--lighthouse-dense-layers", "6"))
    with pytest.raises(ValueError, match=r"--lighthouse-dense-layers 0,1 keeps all 2 layers \(--num-layers\) dense"):
        validate_lighthouse_args(parse("--lighthouse", "--lighthouse-dense-layers", "0,1", num_layers=2))


def test_the_data_loaders_attention_mask_is_refused_with_its_size():
    """Megatron-LM builds a [1, s, s] boolean mask per sample by default: 17.2 GB at 128K tokens."""
    args = parse("--lighthouse", seq_length=131072)
    args.create_attention_mask_in_dataloader = True
    with pytest.raises(ValueError) as err:
        validate_lighthouse_args(args)
    assert str(err.value) == (
        "--create-attention-mask-in-dataloader (Megatron-LM's default) with --lighthouse: the data loader would build "
        "a [1, 131072, 131072] boolean mask for every sample, 17.2 GB each at --seq-length 131072 (from a float32 "
        "[s, s] tensor, 68.7 GB, in the data-loader workers), which Lighthouse layers and the stock causal kernels "
        "never read; pass --no-create-attention-mask-in-dataloader")
    args.create_attention_mask_in_dataloader = False
    assert validate_lighthouse_args(args) == LighthouseConfig()


def _megatron_args(cp: int = 1, **values) -> argparse.Namespace:
    """``--lighthouse`` at 128K plus Megatron-LM's own attributes (as its parser names them) set to ``values``."""
    args = parse("--lighthouse", seq_length=131072, cp=cp)
    args.create_attention_mask_in_dataloader = False
    for name, value in values.items():
        setattr(args, name, value)
    return args


@pytest.mark.parametrize("attr, message", [
    ("reset_attention_mask", r"^--reset-attention-mask with --lighthouse: a document mask .* Megatron-LM drops it "
                             r"silently; Lighthouse selects over each sequence as one causal document; drop it"),
    ("reset_position_ids", r"^--reset-position-ids with --lighthouse: positions restarting at each end-of-document "
                           r"token.*; drop it"),
    ("sft", r"^--sft with --lighthouse: packed \(THD\) batches .*; fine-tune the dense model instead"),
    ("dataloader_inter_document_masking", r"^--dataloader-inter-document-masking with --lighthouse: packed \(THD\) "
                                          r"batches with attention cut at document boundaries.*; drop it"),
])
def test_document_wise_data_is_refused_at_start_up(attr, message):
    """Document masks, reset positions and packed (THD) batches: Lighthouse selects over the whole sequence."""
    with pytest.raises(ValueError, match=message):
        validate_lighthouse_args(_megatron_args(**{attr: True}))
    assert validate_lighthouse_args(_megatron_args(**{attr: False})) == LighthouseConfig()


def test_multi_latent_attention_is_refused_at_start_up():
    with pytest.raises(ValueError, match=r"^--multi-latent-attention with --lighthouse: .*drop one of the two"):
        validate_lighthouse_args(_megatron_args(multi_latent_attention=True))


def _without_apex(monkeypatch, missing=("apex", "fused_weight_gradient_mlp_cuda")):
    """Make ``missing`` modules unfindable for the hook's checks, as on a machine without Apex."""
    import megatron_lighthouse.megatron_lm as megatron_lm

    real = megatron_lm.importlib.util.find_spec
    monkeypatch.setattr(megatron_lm.importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else real(name, *a))


def test_the_local_implementation_needs_the_persistent_layer_norm_off(monkeypatch):
    """--transformer-impl local: torch's RMSNorm (and, without Apex, LayerNorm) refuses the persistent layer norm;
    TransformerEngine's layers take it."""
    _without_apex(monkeypatch)
    ok = dict(normalization="RMSNorm", no_persist_layer_norm=True, gradient_accumulation_fusion=False)
    assert validate_lighthouse_args(_megatron_args(**ok)) == LighthouseConfig()
    with pytest.raises(ValueError) as err:
        validate_lighthouse_args(_megatron_args(**{**ok, "no_persist_layer_norm": False}))
    assert str(err.value) == (
        "--transformer-impl local with the persistent layer norm (Megatron-LM's default): the local layers' RMSNorm "
        "is torch's, which refuses it (\"persist_layer_norm not supported by torch LayerNorm\" when the model is "
        "built); pass --no-persist-layer-norm")
    with pytest.raises(ValueError, match=r"without Apex the local layers' LayerNorm is torch's"):
        validate_lighthouse_args(_megatron_args(**{**ok, "no_persist_layer_norm": False, "normalization": "LayerNorm"}))
    te = _megatron_args(**{**ok, "no_persist_layer_norm": False})
    te.transformer_impl = "transformer_engine"
    assert validate_lighthouse_args(te) == LighthouseConfig()


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_gradient_accumulation_fusion_needs_apex_with_every_implementation(monkeypatch, impl):
    """Megatron's output layer (ColumnParallelLinear) needs Apex's fused_weight_gradient_mlp_cuda for the default
    gradient-accumulation fusion with TransformerEngine too: TE from the package registry, without Apex, died at the
    first iteration. Refused at start-up without the extension; taken with it (a stand-in spec)."""
    import importlib.machinery

    import megatron_lighthouse.megatron_lm as megatron_lm

    args = _megatron_args(normalization="RMSNorm", no_persist_layer_norm=True, gradient_accumulation_fusion=True)
    args.transformer_impl = impl
    real = megatron_lm.importlib.util.find_spec
    monkeypatch.setattr(megatron_lm.importlib.util, "find_spec",
                        lambda name, *a: None if name == "fused_weight_gradient_mlp_cuda" else real(name, *a))
    with pytest.raises(ValueError) as err:
        validate_lighthouse_args(args)
    assert str(err.value) == (
        "gradient-accumulation fusion (Megatron-LM's default) without Apex: Megatron's linear layers (the output "
        "layer with every --transformer-impl) need Apex's fused_weight_gradient_mlp_cuda extension for it, which is "
        "not importable here (TransformerEngine from the package registry comes without Apex); pass "
        "--no-gradient-accumulation-fusion")
    stand_in = importlib.machinery.ModuleSpec("fused_weight_gradient_mlp_cuda", None)
    monkeypatch.setattr(megatron_lm.importlib.util, "find_spec",
                        lambda name, *a: stand_in if name == "fused_weight_gradient_mlp_cuda" else real(name, *a))
    assert validate_lighthouse_args(args) == LighthouseConfig()
    args.gradient_accumulation_fusion = False
    monkeypatch.undo()
    _without_apex(monkeypatch)
    assert validate_lighthouse_args(args) == LighthouseConfig()


def test_context_parallel_settings_are_refused_at_start_up():
    pytest.importorskip("megatron.core")
    assert validate_lighthouse_args(_megatron_args(cp=2, cp_comm_type=["p2p"], attention_dropout=0.0)) is not None
    underscoreless = "all_gather".replace("_", "")  # the spelling Megatron-LM's --help advertises
    with pytest.raises(ValueError) as err:
        validate_lighthouse_args(_megatron_args(cp=2, cp_comm_type=[underscoreless], attention_dropout=0.0))
    assert str(err.value).startswith(
        f"--cp-comm-type {underscoreless} with --lighthouse: cp_comm_type[0]='{underscoreless}' "
        "(context_parallel_size=2): not a context-parallel communication type of TransformerEngine, which accepts "
        "'p2p', 'all_gather', 'a2a', 'a2a+p2p'; use 'all_gather' (TransformerEngine's spelling)")
    with pytest.raises(ValueError) as err:
        validate_lighthouse_args(_megatron_args(cp=2, cp_comm_type=["p2p"], attention_dropout=0.1))
    assert str(err.value) == (
        "--attention-dropout 0.1 (Megatron-LM's default is 0.1) with --context-parallel-size 2 and --transformer-impl "
        "local: the torch-SDPA core attention has no dropout under context parallelism; pass --attention-dropout 0")
    # Without context parallelism dropout is fine; with TransformerEngine it is left to TransformerEngine.
    assert validate_lighthouse_args(_megatron_args(attention_dropout=0.1)) is not None
    te = _megatron_args(cp=2, cp_comm_type=["p2p"], attention_dropout=0.1)
    te.transformer_impl = "transformer_engine"
    assert validate_lighthouse_args(te) is not None


def test_dense_from_iteration_needs_lighthouse():
    with pytest.raises(ValueError, match=r"--lighthouse-dense-from-iteration 10: needs --lighthouse"):
        validate_lighthouse_args(parse("--lighthouse-dense-from-iteration", "10"))
    assert validate_lighthouse_args(parse("--lighthouse", "--lighthouse-dense-from-iteration", "10")) is not None


@pytest.mark.parametrize("flag, value", [
    ("--lighthouse-topk", "100"),  # invalid too: refused for what it is without --lighthouse
    ("--lighthouse-topk", "1024"),
    ("--lighthouse-pooling-factor", "8"),
    ("--lighthouse-levels", "2"),
    ("--lighthouse-dense-layers", "0,-1"),
    ("--lighthouse-rope", "tokens"),
])
def test_lighthouse_settings_need_lighthouse(flag, value):
    """Without --lighthouse every layer is dense: a Lighthouse setting given anyway was silently ignored."""
    with pytest.raises(ValueError) as err:
        validate_lighthouse_args(parse(flag, value))
    assert str(err.value) == (f"{flag} {value}: needs --lighthouse (without it every layer is dense and the Lighthouse "
                              "settings are unused)")
    if value != "100":  # with --lighthouse the same setting is taken
        assert validate_lighthouse_args(parse("--lighthouse", flag, value, seq_length=131072)) is not None


def test_defaults_and_monitor_flags_pass_without_lighthouse():
    """The defaults spelled out, and the GPU monitor (which watches dense runs too), need no --lighthouse."""
    assert validate_lighthouse_args(parse("--lighthouse-topk", "2048", "--lighthouse-dense-layers", "0,1,-2,-1",
                                          "--lighthouse-rope", "entries")) is None
    assert validate_lighthouse_args(parse("--lighthouse-monitor", "--lighthouse-monitor-interval", "0.5")) is None


def test_schedule_from_args():
    schedule = lighthouse_schedule_from_args(parse("--lighthouse", "--lighthouse-dense-from-iteration", "3"))
    assert [schedule.enabled_at(i) for i in range(5)] == [True, True, True, False, False]
    assert all(lighthouse_schedule_from_args(parse("--lighthouse")).enabled_at(i) for i in (0, 10**9))


def summary(args, num_heads=32, head_dim=128):
    return lighthouse_summary(args, validate_lighthouse_args(args), num_heads, head_dim)


def test_summary_line():
    line = summary(parse("--lighthouse", seq_length=524288, num_layers=24))
    assert "seq_length 524288 -> subsequence 49152" in line  # 524288/16 + 2*4*2048
    ratio = (49152 / 524288) ** 2
    assert f"{ratio:.2%} of dense ({1 / ratio:.1f}x fewer)" in line
    assert "20/24 layers Lighthouse, dense layers [0, 1, 22, 23]" in line
    assert line.endswith("Lighthouse throughout")
    # With CP 2 the subsequence length is the same, summed over the 4 chunks.
    assert "-> subsequence 49152" in summary(parse("--lighthouse", seq_length=524288, cp=2))
    assert "off" in summary(parse())
    line = summary(parse("--lighthouse", "--lighthouse-dense-from-iteration", "100", seq_length=524288,
                         num_layers=24))
    assert line.endswith("dense from iteration 100")


def _core_attention_names(spec):
    return [s.submodules.self_attention.submodules.core_attention.module.__name__ for s in spec.layer_specs]


@pytest.fixture
def megatron():
    pytest.importorskip("megatron.core")
    init_megatron()


def _config(num_layers: int = 6):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4,
                             use_cpu_initialization=True, ffn_hidden_size=128)


def test_block_spec_from_args(megatron):
    config = _config()
    args = parse("--lighthouse")
    names = _core_attention_names(lighthouse_block_spec_from_args(args, lighthouse_config_from_args(args), config))
    assert names == ["SDPACoreAttention"] * 2 + ["LighthouseCoreAttention"] * 2 + ["SDPACoreAttention"] * 2
    args = parse("--lighthouse", "--lighthouse-dense-layers", "3")
    names = _core_attention_names(lighthouse_block_spec_from_args(args, lighthouse_config_from_args(args), config))
    assert names == ["LighthouseCoreAttention"] * 3 + ["SDPACoreAttention"] + ["LighthouseCoreAttention"] * 2
    assert _core_attention_names(lighthouse_block_spec_from_args(parse(), None, config)) == ["SDPACoreAttention"] * 6


def test_maybe_switch_to_dense(megatron, caplog):
    from megatron_lighthouse.schedule import lighthouse_modules

    args = parse("--lighthouse", "--lighthouse-topk", "128", "--lighthouse-levels", "2",
                 "--lighthouse-pooling-factor", "2", "--lighthouse-dense-from-iteration", "2", seq_length=SEQ)
    cfg = validate_lighthouse_args(args)
    config = _config()

    def build():
        return tiny_gpt(config, lighthouse_block_spec_from_args(args, cfg, config))

    model = build()
    modules = lighthouse_modules(model)
    assert len(modules) == 2
    with caplog.at_level(logging.INFO, logger="megatron_lighthouse.megatron_lm"):
        switched = [maybe_switch_to_dense([model], args, it) for it in range(4)]
        states = [m.enabled for m in modules]
    assert switched == [False, False, True, False]
    assert states == [False, False]
    # Only the hook's records: megatron-core 0.19 also logs a deprecation warning when GPTModel is built.
    ours = [r.getMessage() for r in caplog.records if r.name == "megatron_lighthouse.megatron_lm"]
    assert ours == ["Lighthouse: iteration 2 >= --lighthouse-dense-from-iteration 2: 2 Lighthouse layers "
                               "switched to dense attention (layers 3, 4)"]
    # Resuming past the switch point: the fresh model is switched at its first iteration.
    resumed = build()
    assert maybe_switch_to_dense(resumed, args, 7) is True
    assert not any(m.enabled for m in lighthouse_modules(resumed))
    # The patch's call passes no iteration: the training loop's args.curr_iteration, else (evaluation-only runs,
    # which never set it) the loaded checkpoint's args.iteration.
    args.iteration = 5
    fresh = build()
    assert maybe_switch_to_dense(fresh, args) is True
    args.iteration, args.curr_iteration = 5, 1
    fresh = build()
    assert maybe_switch_to_dense(fresh, args) is False and all(m.enabled for m in lighthouse_modules(fresh))


def test_args_provider_chains_the_previous_provider():
    def other(parser):
        parser.add_argument("--modelopt-like", type=int, default=0)
        return parser

    parser = lighthouse_args_provider(other)(argparse.ArgumentParser())
    args = parser.parse_args(["--modelopt-like", "3", "--lighthouse", "--lighthouse-levels", "2"])
    assert (args.modelopt_like, args.lighthouse, args.lighthouse_levels) == (3, True, 2)
    assert lighthouse_args_provider()(argparse.ArgumentParser()).parse_args([]).lighthouse is False


@dataclasses.dataclass
class ModelConfig:
    """Stand-in for Megatron-LM's ``GPTModelConfig``: a ``TransformerConfig`` plus the layer spec (a spec or a
    callable ``(model_config, vp_stage=...)`` that its builder calls per virtual pipeline stage)."""

    transformer: object = None
    transformer_layer_spec: object = None


def _startup_args(*argv: str, **kw) -> argparse.Namespace:
    args = parse(*argv, **kw)
    args.hidden_size, args.num_attention_heads, args.kv_channels, args.curr_iteration = 1024, 8, None, 0
    args.log_interval = 1
    return args


def test_the_config_is_built_once_at_start_up(monkeypatch):
    """start_lighthouse builds one LighthouseConfig from the flags and passes it whole to the summary and the spec."""
    import megatron_lighthouse.megatron_lm as megatron_lm

    built = []
    monkeypatch.setattr(megatron_lm, "LighthouseConfig", lambda **kw: built.append(kw) or LighthouseConfig(**kw))
    model_config = ModelConfig()
    cfg = start_lighthouse(_startup_args("--lighthouse", seq_length=131072), model_config, printer=lambda line: None)
    assert len(built) == 1 and model_config.transformer_layer_spec.args[1] is cfg


def test_start_lighthouse_validates_and_reports(monkeypatch):
    registered = []
    monkeypatch.setattr(importlib.import_module("torch.optim.optimizer"), "register_optimizer_step_post_hook",
                        registered.append)
    printed = []
    model_config = ModelConfig()
    cfg = start_lighthouse(_startup_args("--lighthouse", seq_length=131072), model_config, printer=printed.append)
    assert cfg == LighthouseConfig()
    assert len(printed) == 1 and "seq_length 131072 -> subsequence 24576" in printed[0]  # head_dim 1024/8
    assert callable(model_config.transformer_layer_spec)
    assert "vp_stage" in inspect.signature(model_config.transformer_layer_spec).parameters
    assert registered == []  # no monitor unless asked
    with pytest.raises(ValueError, match=r"--seq-length 1000 does not fit --lighthouse-topk 2048"):
        start_lighthouse(_startup_args("--lighthouse", seq_length=1000), ModelConfig())
    dense = ModelConfig()
    assert start_lighthouse(_startup_args(seq_length=1000), dense, printer=printed.append) is None
    assert dense.transformer_layer_spec is None and printed[-1].startswith("Lighthouse: off")


def test_start_lighthouse_refuses_what_it_cannot_wire():
    with pytest.raises(ValueError, match=r"--lighthouse with --spec megatron_lighthouse.spec lighthouse_layer_spec"):
        args = _startup_args("--lighthouse", seq_length=131072)
        args.spec = ["megatron_lighthouse.spec", "lighthouse_layer_spec"]
        start_lighthouse(args, ModelConfig())

    @dataclasses.dataclass
    class OldModelConfig:  # a model config without transformer_layer_spec: the spec would never be used
        transformer: object = None

    with pytest.raises(ValueError, match=r"OldModelConfig has neither a transformer_layer_spec nor a hybrid_stack_spec "
                                         r"field"):
        start_lighthouse(_startup_args("--lighthouse", seq_length=131072), OldModelConfig())


def test_summary_when_the_sequence_is_too_short_to_gain():
    line = summary(parse("--lighthouse", "--lighthouse-topk", "128", "--lighthouse-levels", "2",
                         "--lighthouse-pooling-factor", "2", seq_length=256), 4, 16)
    assert "-> subsequence 384" in line and "225.00% of dense (2.2x more: " in line


def test_monitor_steps_once_per_iteration(monkeypatch):
    """--lighthouse-monitor: a global optimizer post-hook starts the monitor on the first optimizer step and
    steps it once per Megatron iteration, however many inner optimizers step."""
    import megatron_lighthouse.monitor as monitor_pkg

    registered, steps = [], []

    class FakeMonitor:
        @classmethod
        def from_args(cls, args):
            assert args.lighthouse_monitor
            return cls()

        def start(self):
            steps.append("start")
            return self

        def step(self, iteration):
            steps.append(iteration)

        def stop(self):
            pass

    monkeypatch.setattr(importlib.import_module("torch.optim.optimizer"), "register_optimizer_step_post_hook",
                        registered.append)
    monkeypatch.setattr(monitor_pkg, "GPUMonitor", FakeMonitor)
    args = _startup_args("--lighthouse-monitor")
    assert start_lighthouse(args, ModelConfig()) is None
    (hook,) = registered
    for iteration in (0, 0, 1, 1, 1, 2):  # Megatron sets curr_iteration before each train step
        args.curr_iteration = iteration
        hook(None, (), {})
    assert steps == ["start", 1, 2, 3]


def test_model_config_builds_the_lighthouse_block_per_stage(megatron):
    """The callable that ``start_lighthouse`` puts into the model config is what Megatron-LM's GPT builder calls
    (``spec(model_config, vp_stage=...)``): it must give the Lighthouse decoder block of that config."""
    args = _startup_args("--lighthouse", "--lighthouse-dense-layers", "0,-1", seq_length=131072)
    model_config = ModelConfig(transformer=_config())
    start_lighthouse(args, model_config)
    spec = model_config.transformer_layer_spec(model_config, vp_stage=None)
    assert _core_attention_names(spec) == (["SDPACoreAttention"] + ["LighthouseCoreAttention"] * 4
                                           + ["SDPACoreAttention"])

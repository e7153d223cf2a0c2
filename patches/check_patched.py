"""CPU check of a patched Megatron-LM checkout: the hook really builds, trains and switches Lighthouse layers, in
``pretrain_gpt.py`` and (where the checkout has it) ``pretrain_hybrid.py``.

Usage (no GPU, no data, no download; the checkout's own ``megatron`` package is used)::

    python patches/check_patched.py MEGATRON_LM_DIR
    python patches/check_patched.py MEGATRON_LM_DIR -- COMMAND...

The second form checks a launch command instead (e.g. the line an example prints with ``DRY_RUN=1``, pasted as
one quoted string or as words; leading ``VAR=value`` words are set in the environment, and everything up to
``pretrain_gpt.py`` or ``pretrain_hybrid.py`` is dropped): the checkout's script of that name (patched or not;
``pretrain_gpt.py`` when the command names neither) parses and validates its
arguments and builds its model on CPU (``--use-cpu-initialization`` added), which is where Megatron-LM refuses
flags that need TransformerEngine or Apex; it prints the core attention of every layer and which layers run
Lighthouse. A command with tensor, pipeline or context parallelism is parsed as rank 0 of a world of exactly that
size on a Hopper GPU; the model is built only without tensor and pipeline parallelism (under context parallelism
every rank holds the same model, built here with context parallelism 1). Megatron-LM's own output is kept back; when
it refuses the command, its last lines (without its argument dump and links) and a one-line ``error:`` are printed
(exit 1). Without TransformerEngine in this Python, a TransformerEngine command (``--transformer-impl
transformer_engine``, Megatron-LM's default) is checked in its local form, as the examples write it with
``TRANSFORMER_IMPL=local`` (FP8 flags dropped, as FP8 needs TransformerEngine), and says so: its TransformerEngine
parts can only be checked where TransformerEngine is installed.

It runs each patched script's ``__main__`` with Megatron-LM's own argument parser on a tiny model
(``--lighthouse ... --lighthouse-dense-from-iteration 2``; ``pretrain_hybrid.py`` with ``--hybrid-layer-pattern``
``*-`` six times), with ``pretrain`` replaced by a stand-in that builds the model the way ``pretrain`` does (the
model config's builder), then calls the patched ``forward_step`` (a CPU batch in place of ``get_batch``) at
iterations 0..3 with a backward pass each. It fails unless the Lighthouse layers are built where
``--lighthouse-dense-layers`` says (in the hybrid model: counted among its attention layers), run Lighthouse before
the switch iteration and dense from it on, and a bad ``--seq-length`` (a pattern with too few attention layers) is
refused with the flag named.

Megatron-LM >= 0.19 uses ``typing.override`` (Python 3.12); on Python 3.11 the ``typing_extensions`` backport
stands in for it inside this check only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import runpy
import shlex
import sys
import typing
import warnings

#: The self-check's tiny model; its Lighthouse layers attend over 768 of the 1024 positions (56% of the attention
#: FLOPs of dense), so the hook's summary shows a saving, as at a real length.
FLAGS = [
    "--num-layers", "6", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
    "--seq-length", "1024", "--max-position-embeddings", "1024", "--micro-batch-size", "2",
    "--global-batch-size", "2", "--train-iters", "4", "--lr", "1e-3", "--transformer-impl", "local",
    "--use-cpu-initialization", "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--mock-data", "--no-create-attention-mask-in-dataloader",
    "--lighthouse", "--lighthouse-topk", "128", "--lighthouse-levels", "2", "--lighthouse-pooling-factor", "4",
    "--lighthouse-dense-layers", "0,-1", "--lighthouse-dense-from-iteration", "2",
]
SWITCH = 2
#: Megatron-LM's entry points the hook goes into.
SCRIPTS = ("pretrain_gpt.py", "pretrain_hybrid.py")
#: The tiny model of each script, and the 0-based decoder layers that run Lighthouse in it (dense layers 0, -1: of
#: the 6 GPT layers, of the 6 attention layers of the hybrid stack, which are its layers 0, 2, ..., 10).
HYBRID_FLAGS = ["--hybrid-layer-pattern", "*-" * 6] + FLAGS[2:]
MODELS = {"pretrain_gpt.py": (FLAGS, [1, 2, 3, 4]), "pretrain_hybrid.py": (HYBRID_FLAGS, [2, 4, 6, 8])}
#: A setting each script must refuse at start-up, and what the refusal names.
REFUSED = {"pretrain_gpt.py": (("--seq-length", "240"), "--seq-length 240"),
           "pretrain_hybrid.py": (("--hybrid-layer-pattern", "*-*-"), "--hybrid-layer-pattern *-*- with "
                                                                       "--lighthouse-dense-layers 0,-1: keeps all 2 "
                                                                       "attention layers")}


#: Lines of Megatron-LM's output that say nothing about a refusal: its argument dump (from the first of these lines
#: to the second) and lines with links (its note about an internal package index, for one).
ARGUMENT_DUMP = (re.compile(r"^-+ arguments -+$"), re.compile(r"^-+ end of arguments -+$"))


def tail_of(text: str, lines: int = 15) -> str:
    """The last ``lines`` lines of Megatron-LM's ``text``, without its argument dump and lines with links."""
    kept, in_dump = [], False
    for line in text.splitlines(keepends=True):
        if ARGUMENT_DUMP[0].match(line.strip()):
            in_dump = True
        elif in_dump:
            in_dump = not ARGUMENT_DUMP[1].match(line.strip())
        elif "://" not in line:
            kept.append(line)
    return "".join(kept[-lines:])


@contextlib.contextmanager
def megatron_output(show_on_error: bool = True):
    """Keep back what Megatron-LM prints, warns and logs inside the block (yields the text so far); when the block
    raises and ``show_on_error``, write its last lines to stderr first (:func:`tail_of`)."""
    output = io.StringIO()
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield output
    except BaseException:
        if show_on_error:
            sys.stderr.write(tail_of(output.getvalue()))
        raise
    finally:
        logging.disable(logging.NOTSET)


def hook_lines(output: io.StringIO) -> list:
    """The hook's summary lines (``Lighthouse: ...``) in kept-back output."""
    return [line for line in output.getvalue().splitlines() if line.startswith("Lighthouse")]


def run_main(mlm: str, argv: list, script: str = "pretrain_gpt.py") -> dict:
    """Run the checkout's ``script`` as ``__main__`` with ``argv``; return what it passed to pretrain."""
    from megatron.training import inprocess_restart

    captured: dict = {}

    def fake_pretrain(cfg_container, datasets_provider, model_type, forward_step_func, **kwargs):
        captured.update(cfg=cfg_container, forward_step=forward_step_func)

    inprocess_restart.maybe_wrap_for_inprocess_restart = lambda fn: (fake_pretrain, None)
    sys.argv = [script, *argv]
    runpy.run_path(os.path.join(mlm, script), run_name="__main__")
    return captured


def build_model(captured: dict):
    """Build the model of a :func:`run_main` call as ``pretrain`` would (on CPU, in a gloo world of one); return
    it with its core attention class names per layer (a hybrid layer without attention: its class name). Under
    context parallelism every rank holds the same model: it is built with context parallelism 1 (a world of one has
    no larger group)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training import get_args
    from megatron.training.global_vars import set_global_variables, unset_global_variables

    from megatron_lighthouse.process_group import init_single_process_megatron

    args = get_args()
    unset_global_variables()  # the parser set only args; set timers and the rest as pretrain() would
    set_global_variables(args, build_tokenizer=False)
    init_single_process_megatron("gloo", prefix="mlm_check_")
    model_config = captured["cfg"].model
    model_config.transformer.context_parallel_size = 1
    model = model_config.get_builder_cls()(model_config).build_model(
        ProcessGroupCollection.use_mpu_process_groups(), pre_process=True, post_process=True)
    kinds = [type(_core_attention(layer) or layer).__name__ for layer in model.decoder.layers]
    return model, kinds


def _core_attention(layer):
    """A decoder layer's core attention (``None`` for a hybrid layer without attention)."""
    return getattr(layer.self_attention, "core_attention", None)


def lighthouse_layers(model) -> list:
    """0-based indices of the decoder layers whose core attention runs Lighthouse (not one of its dense layers)."""
    from megatron_lighthouse.core_attention import LighthouseCoreAttention

    return [i for i, layer in enumerate(model.decoder.layers)
            if isinstance(_core_attention(layer), LighthouseCoreAttention) and not _core_attention(layer).dense_layer]


def check(mlm: str, script: str) -> None:
    import torch
    from megatron.training import get_args
    from megatron.training.global_vars import unset_global_variables

    from megatron_lighthouse.schedule import lighthouse_modules

    flags, expected = MODELS[script]
    print(f"== {script}")
    unset_global_variables()
    with megatron_output() as output:
        captured = run_main(mlm, flags, script)
        model, kinds = build_model(captured)
    print(*hook_lines(output), sep="\n")
    args = get_args()
    assert args.lighthouse and args.lighthouse_dense_from_iteration == SWITCH, "the --lighthouse flags were not parsed"
    print("core attention per layer:", kinds)
    assert lighthouse_layers(model) == expected, f"Lighthouse layers not where expected: {kinds}"

    forward_step = captured["forward_step"]
    b, s = args.micro_batch_size, args.seq_length
    tokens = torch.randint(0, 256, (b, s + 1), generator=torch.Generator().manual_seed(0))
    batch = dict(attention_mask=None, cu_seqlens=None, cu_seqlens_padded=None, hybrid_cp_group=None,
                 labels=tokens[:, 1:], local_cp_size=None, loss_mask=torch.ones(b, s), max_seqlen=None,
                 position_ids=torch.arange(s).expand(b, s), tokens=tokens[:, :-1])
    forward_step.__globals__["get_batch"] = lambda data_iterator, vp_stage=None: [batch[k] for k in sorted(batch)]
    calls = []
    for module in lighthouse_modules(model):
        module.register_forward_hook(lambda mod, inp, out: calls.append(mod.enabled))
    for iteration in range(4):
        args.curr_iteration = iteration
        calls.clear()
        with megatron_output():
            loss, _ = forward_step(iter(()), model)
            loss.float().mean().backward()
        expect = iteration < SWITCH
        assert calls and all(on == expect for on in calls), (
            f"iteration {iteration}: Lighthouse layers ran enabled={calls}, expected {expect}")
        print(f"iteration {iteration}: {len(calls)} Lighthouse layers ran {'Lighthouse' if expect else 'dense'}")

    (flag, value), refusal = REFUSED[script]
    bad = [*flags[:flags.index(flag) + 1], value, *flags[flags.index(flag) + 2:]]
    unset_global_variables()
    try:
        with megatron_output(show_on_error=False):
            run_main(mlm, bad, script)
    except ValueError as err:
        assert refusal in str(err), err
        print(f"bad {flag} refused:", str(err)[:120], "...")
    else:
        raise AssertionError(f"{flag} {value} was accepted")
    print(f"OK: the patched {script} parses the flags, builds Lighthouse layers, trains and switches to dense")


def command_arguments(words: list) -> tuple:
    """``(script, arguments)`` of a launch command (one string or its words): leading ``VAR=value`` words go into
    ``os.environ``, everything up to the word ending in ``pretrain_gpt.py`` or ``pretrain_hybrid.py`` (the script;
    ``pretrain_gpt.py`` if there is none) is dropped."""
    if len(words) == 1 and any(c.isspace() for c in words[0]):
        try:
            words = shlex.split(words[0])
        except ValueError as err:  # an unbalanced quote
            sys.exit(f"error: the command cannot be split into words as a shell would ({err})")
    words = list(words)
    while words and "=" in words[0] and words[0].split("=", 1)[0].isidentifier():
        name, value = words.pop(0).split("=", 1)
        os.environ[name] = value
    at = [i for i, word in enumerate(words) if word.endswith(SCRIPTS)]
    if not at:
        return SCRIPTS[0], words
    return next(name for name in SCRIPTS if words[at[0]].endswith(name)), words[at[0] + 1:]


#: The flags of the parallel sizes that split the model over ranks, and the one that splits the sequence.
SPLIT_MODEL = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size")
SPLIT_SEQUENCE = ("--context-parallel-size",)


def parallel_size(argv: list, flags: tuple) -> int:
    """The product of the sizes the command gives to ``flags`` (1 for each flag it leaves out)."""
    size = 1
    for flag in flags:
        if flag in argv[:-1]:
            value = argv[argv.index(flag) + 1]
            if not value.isdigit() or int(value) < 1:
                sys.exit(f"error: {flag} {value}: must be a positive integer")
            size *= int(value)
    return size


#: What the world of a checked command counts: data parallelism adds ranks that hold the same model.
GROUP = ", its tensor x pipeline x context parallel ranks"
#: The flags of a TransformerEngine command's local form, as the examples add them for TRANSFORMER_IMPL=local:
#: Megatron-LM's defaults that need TransformerEngine or Apex, off.
LOCAL_FORM = ("--transformer-impl", "local", "--no-rope-fusion", "--no-persist-layer-norm",
              "--no-gradient-accumulation-fusion")


def needs_local_form(argv: list) -> bool:
    """Whether ``argv`` runs TransformerEngine (``--transformer-impl transformer_engine``, Megatron-LM's default)
    where this Python has none."""
    import importlib.util

    impl = argv[argv.index("--transformer-impl") + 1] if "--transformer-impl" in argv[:-1] else "transformer_engine"
    return impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None


def local_form(argv: list) -> tuple:
    """``(the local form of argv, the TransformerEngine-only flags dropped from it)``: ``--transformer-impl local``
    and the flags of :data:`LOCAL_FORM`; the ``--fp8*`` flags, with their values, dropped (FP8 needs TE)."""
    out, dropped, i = [], [], 0
    while i < len(argv):
        word = argv[i]
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if word == "--transformer-impl":
            i += 2
            continue
        if word.startswith("--fp8"):
            dropped.extend(argv[i:i + 1 + takes_value])
            i += 1 + takes_value
            continue
        out.append(word)
        i += 1
    out += ["--transformer-impl", "local"] + [flag for flag in LOCAL_FORM[2:] if flag not in out]
    return out, dropped


class Command(typing.NamedTuple):
    """A launch command as it is checked: the ``script`` it runs and its arguments, ``form`` (``" in its local
    form"`` or ``""``), the ``world`` of ranks it is checked as rank 0 of, and whether its model is ``split`` over
    them."""

    script: str
    argv: list
    form: str
    world: int
    split: bool


def read_command(words: list, mlm: str) -> Command:
    """The :class:`Command` of ``words`` (see :func:`command_arguments`) for the checkout ``mlm``; its local form,
    with a note, where TransformerEngine is needed and missing. Exits with one ``error:`` line for words it cannot
    read or a script the checkout lacks."""
    script, argv = command_arguments(words)
    if not os.path.isfile(os.path.join(mlm, script)):
        sys.exit(f"error: the command runs {script}, and {mlm} has none (a Megatron-LM without HybridModel)")
    form = ""
    if needs_local_form(argv):
        argv, dropped = local_form(argv)
        form = " in its local form"
        print(f"note: this Python has no TransformerEngine: the command is checked in its local form ("
              f"{' '.join(LOCAL_FORM)}{', without ' + ' '.join(dropped) if dropped else ''}); its TransformerEngine "
              f"parts (the TE layers, RoPE fusion, FP8) can only be checked where TransformerEngine is installed")
    if "--use-cpu-initialization" not in argv:
        argv.append("--use-cpu-initialization")
    world = parallel_size(argv, SPLIT_MODEL + SPLIT_SEQUENCE)  # the smallest world the command runs in
    return Command(script, argv, form, world, parallel_size(argv, SPLIT_MODEL) > 1)


def check_command(mlm: str, command: Command) -> None:
    """Parse, validate and build the model of a launch command as one rank; exit 1 with one ``error:`` line (after
    the tail of Megatron-LM's output) when Megatron-LM or the hook refuses it."""
    import torch

    script, argv, form, world, split = command
    os.environ["WORLD_SIZE"], os.environ["RANK"] = str(world), "0"  # Megatron-LM reads its world from these
    try:
        with megatron_output() as output:
            if not torch.cuda.is_available():  # its parallel settings consult the GPU generation: answer as Hopper
                from megatron.training import arguments

                arguments.get_device_arch_version = lambda: 9
            captured = run_main(mlm, argv, script)
            model, kinds = (None, None) if split else build_model(captured)
    except Exception as err:  # noqa: BLE001 - whatever Megatron-LM raised is the answer, reported in one line
        message = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        hint = ""
        if re.search(r"\bTE\b|Transformer ?Engine|transformer_engine", message):
            hint = (" (this Python has no TransformerEngine: check the TRANSFORMER_IMPL=local form of the command "
                    "here, or run the check where TransformerEngine is installed)")
        sys.exit(f"error: {mlm}/{script} refuses the command: {type(err).__name__}: {message}{hint}")
    lines = hook_lines(output)
    if lines:  # the hook's summary (none on the unpatched route)
        print(*lines, sep="\n")
    if split:
        print(f"OK: {mlm}/{script} accepts the command{form} as rank 0 of {world}{GROUP} (its model is split over "
              "ranks: not built here)")
        return
    print("core attention per layer:", kinds)
    print("Lighthouse layers:", lighthouse_layers(model) or "none")
    one_rank = f" (as rank 0 of {world}{GROUP})" if world > 1 else ""
    print(f"OK: {mlm}/{script} accepts the command{form} and builds its model{one_rank}")


USAGE = ("usage: python patches/check_patched.py MEGATRON_LM_DIR [-- COMMAND...]   (a Megatron-LM checkout, "
         "patched unless a COMMAND is given)")


def main() -> None:
    argv = sys.argv[1:]
    words = argv[argv.index("--") + 1:] if "--" in argv else None
    argv = argv[:argv.index("--")] if "--" in argv else argv
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        return
    if len(argv) != 1 or words == []:
        sys.exit(USAGE)
    if not os.path.isfile(os.path.join(argv[0], "pretrain_gpt.py")):
        sys.exit(f"error: MEGATRON_LM_DIR {argv[0]}: no pretrain_gpt.py there (give the root of a Megatron-LM checkout)")
    mlm = os.path.abspath(argv[0])
    scripts = [script for script in SCRIPTS if os.path.isfile(os.path.join(mlm, script))]
    for script in scripts if words is None else ():
        with open(os.path.join(mlm, script)) as f:
            if "megatron_lighthouse" not in f.read():
                sys.exit(f"{mlm}/{script} is not patched: run patches/apply.sh {mlm} first")
    command = None if words is None else read_command(words, mlm)
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
    sys.path.insert(0, mlm)
    try:
        with megatron_output():  # its import-time warnings (no TransformerEngine, no Apex) are not news here
            import megatron.training  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a missing requirement of the checkout, reported in one line
        sys.exit(f"error: {mlm}: its megatron.training does not import in this Python ({type(err).__name__}: "
                 f"{err}); install Megatron-LM's requirements here")
    if words is None:
        for script in scripts:
            check(mlm, script)
    else:
        check_command(mlm, command)


if __name__ == "__main__":
    main()

"""CPU check of a patched Megatron-LM checkout: the hook really builds, trains and switches Lighthouse layers.

Usage (no GPU, no data, no download; the checkout's own ``megatron`` package is used)::

    python patches/check_patched.py MEGATRON_LM_DIR
    python patches/check_patched.py MEGATRON_LM_DIR -- COMMAND...

The second form checks a launch command instead (e.g. the line an example prints with ``DRY_RUN=1``, pasted as
one quoted string or as words; leading ``VAR=value`` words are set in the environment, and everything up to
``pretrain_gpt.py`` is dropped): the checkout's ``pretrain_gpt.py`` (patched or not) parses and validates its
arguments and builds its model on CPU (``--use-cpu-initialization`` added), which is where Megatron-LM refuses
flags that need TransformerEngine or Apex; it prints the core attention of every layer.

It runs the patched ``pretrain_gpt.py``'s ``__main__`` with Megatron-LM's own argument parser on a tiny model
(``--lighthouse ... --lighthouse-dense-from-iteration 2``), with ``pretrain`` replaced by a stand-in that builds
the model the way ``pretrain`` does (the model config's builder), then calls the patched ``forward_step`` (a CPU
batch in place of ``get_batch``) at iterations 0..3 with a backward pass each. It fails unless the
Lighthouse layers are built where ``--lighthouse-dense-layers`` says, run Lighthouse before the switch
iteration and dense from it on, and a bad ``--seq-length`` is refused with the flag named.

Megatron-LM >= 0.19 uses ``typing.override`` (Python 3.12); on Python 3.11 the ``typing_extensions`` backport
stands in for it inside this check only.
"""

from __future__ import annotations

import os
import runpy
import shlex
import sys
import typing

FLAGS = [
    "--num-layers", "6", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
    "--seq-length", "256", "--max-position-embeddings", "256", "--micro-batch-size", "2",
    "--global-batch-size", "2", "--train-iters", "4", "--lr", "1e-3", "--transformer-impl", "local",
    "--use-cpu-initialization", "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--mock-data", "--no-create-attention-mask-in-dataloader",
    "--lighthouse", "--lighthouse-topk", "128", "--lighthouse-levels", "2", "--lighthouse-pooling-factor", "2",
    "--lighthouse-dense-layers", "0,-1", "--lighthouse-dense-from-iteration", "2",
]
SWITCH = 2


def run_main(mlm: str, argv: list) -> dict:
    """Run the checkout's ``pretrain_gpt.py`` as ``__main__`` with ``argv``; return what it passed to pretrain."""
    from megatron.training import inprocess_restart

    captured: dict = {}

    def fake_pretrain(cfg_container, datasets_provider, model_type, forward_step_func, **kwargs):
        captured.update(cfg=cfg_container, forward_step=forward_step_func)

    inprocess_restart.maybe_wrap_for_inprocess_restart = lambda fn: (fake_pretrain, None)
    sys.argv = ["pretrain_gpt.py", *argv]
    runpy.run_path(os.path.join(mlm, "pretrain_gpt.py"), run_name="__main__")
    return captured


def build_model(captured: dict):
    """Build the model of a :func:`run_main` call as ``pretrain`` would (on CPU, in a gloo world of one); print
    and return it with its core attention class names per layer."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training import get_args
    from megatron.training.global_vars import set_global_variables, unset_global_variables

    from megatron_lighthouse.process_group import init_single_process_megatron

    args = get_args()
    unset_global_variables()  # the parser set only args; set timers and the rest as pretrain() would
    set_global_variables(args, build_tokenizer=False)
    init_single_process_megatron("gloo", prefix="mlm_check_")
    model_config = captured["cfg"].model
    model = model_config.get_builder_cls()(model_config).build_model(
        ProcessGroupCollection.use_mpu_process_groups(), pre_process=True, post_process=True)
    kinds = [type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers]
    print("core attention per layer:", kinds)
    return model, kinds


def check(mlm: str) -> None:
    import torch
    from megatron.training import get_args
    from megatron.training.global_vars import unset_global_variables

    from megatron_lighthouse.core_attention import LighthouseCoreAttention
    from megatron_lighthouse.schedule import lighthouse_modules

    captured = run_main(mlm, FLAGS)
    args = get_args()
    assert args.lighthouse and args.lighthouse_dense_from_iteration == SWITCH, "the --lighthouse flags were not parsed"
    model, kinds = build_model(captured)
    light = [isinstance(layer.self_attention.core_attention, LighthouseCoreAttention) and
             not layer.self_attention.core_attention.dense_layer for layer in model.decoder.layers]
    assert light == [False, True, True, True, True, False], f"Lighthouse layers not where expected: {kinds}"

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
        output, _ = forward_step(iter(()), model)
        output.float().mean().backward()
        expect = iteration < SWITCH
        assert calls and all(on == expect for on in calls), (
            f"iteration {iteration}: Lighthouse layers ran enabled={calls}, expected {expect}")
        print(f"iteration {iteration}: {len(calls)} Lighthouse layers ran {'Lighthouse' if expect else 'dense'}")

    bad = [*FLAGS[:FLAGS.index("--seq-length") + 1], "240", *FLAGS[FLAGS.index("--seq-length") + 2:]]
    unset_global_variables()
    try:
        run_main(mlm, bad)
    except ValueError as err:
        assert "--seq-length 240" in str(err), err
        print("bad --seq-length refused:", str(err)[:120], "...")
    else:
        raise AssertionError("--seq-length 240 was accepted")
    print("OK: the patched pretrain_gpt.py parses the flags, builds Lighthouse layers, trains and switches to dense")


def command_arguments(words: list) -> list:
    """The ``pretrain_gpt.py`` arguments of a launch command (one string or its words): leading ``VAR=value``
    words go into ``os.environ``, everything up to the word ending in ``pretrain_gpt.py`` is dropped."""
    if len(words) == 1 and any(c.isspace() for c in words[0]):
        words = shlex.split(words[0])
    words = list(words)
    while words and "=" in words[0] and words[0].split("=", 1)[0].isidentifier():
        name, value = words.pop(0).split("=", 1)
        os.environ[name] = value
    script = [i for i, word in enumerate(words) if word.endswith("pretrain_gpt.py")]
    return words[script[0] + 1:] if script else words


def check_command(mlm: str, words: list) -> None:
    argv = command_arguments(words)
    if "--use-cpu-initialization" not in argv:
        argv.append("--use-cpu-initialization")
    build_model(run_main(mlm, argv))
    print(f"OK: {mlm}/pretrain_gpt.py accepts the command and builds its model")


def main() -> None:
    argv = sys.argv[1:]
    words = argv[argv.index("--") + 1:] if "--" in argv else None
    argv = argv[:argv.index("--")] if "--" in argv else argv
    if len(argv) != 1 or not os.path.isfile(os.path.join(argv[0], "pretrain_gpt.py")) or words == []:
        sys.exit("usage: python patches/check_patched.py MEGATRON_LM_DIR [-- COMMAND...]   (a Megatron-LM checkout, "
                 "patched unless a COMMAND is given)")
    mlm = os.path.abspath(argv[0])
    with open(os.path.join(mlm, "pretrain_gpt.py")) as f:
        if words is None and "megatron_lighthouse" not in f.read():
            sys.exit(f"{mlm}/pretrain_gpt.py is not patched: run patches/apply.sh {mlm} first")
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
    sys.path.insert(0, mlm)
    if words is None:
        check(mlm)
    else:
        check_command(mlm, words)


if __name__ == "__main__":
    main()

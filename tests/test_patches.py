"""``patches/``: the Megatron-LM patch is a valid git patch that only adds the hook lines to ``pretrain_gpt.py`` and
``pretrain_hybrid.py``; ``apply.sh`` checks, applies each script once, and refuses a conflicting checkout without
touching it."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import megatron_lighthouse.megatron_lm as megatron_lm

PATCHES = pathlib.Path(__file__).resolve().parents[1] / "patches"
PATCH = PATCHES / "megatron_lm_lighthouse.patch"
APPLY = PATCHES / "apply.sh"
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def parse_patch(text: str) -> dict:
    """``{path: [hunk, ...]}``, each hunk ``{"old": [...], "new": [...], "added": [...], "removed": [...]}``;
    asserts the hunk line counts match their headers (what makes it a valid unified diff)."""
    files: dict = {}
    hunk = None
    for line in text.splitlines():
        if line.startswith("diff --git "):
            a, b = line.split()[2:4]
            assert a[2:] == b[2:], f"renames are not hook lines: {line}"
            path = b[2:]
            files[path] = []
        elif line.startswith(("--- ", "+++ ", "index ")):
            continue
        elif m := HUNK.match(line):
            hunk = {"old": [], "new": [], "added": [], "removed": [],
                    "counts": (int(m[2] or 1), int(m[4] or 1))}
            files[path].append(hunk)
        elif line[:1] in (" ", "+", "-"):
            body = line[1:]
            if line[0] != "+":
                hunk["old"].append(body)
            if line[0] != "-":
                hunk["new"].append(body)
            if line[0] == "+":
                hunk["added"].append(body)
            if line[0] == "-":
                hunk["removed"].append(body)
        else:
            assert line.startswith("\\"), f"unexpected patch line: {line!r}"
    for path, hunks in files.items():
        for h in hunks:
            assert (len(h["old"]), len(h["new"])) == h["counts"], f"{path}: hunk counts do not match its header"
    return files


@pytest.fixture(scope="module")
def patch() -> dict:
    return parse_patch(PATCH.read_text())


SCRIPTS = ("pretrain_gpt.py", "pretrain_hybrid.py")


def test_patch_touches_only_the_hook_files(patch):
    assert set(patch) == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_patch_only_adds_hook_lines(patch, script):
    added = [line for h in patch[script] for line in h["added"]]
    removed = [line for h in patch[script] for line in h["removed"]]
    assert len(added) == 4, added
    # The one changed line: Megatron-LM's own extra_args_provider, now wrapped by ours.
    assert removed == ["        extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,"]
    calls = re.compile(r"\b(" + "|".join(megatron_lm.__all__) + r")\(")
    for line in added:
        is_hook = line.startswith("from megatron_lighthouse.megatron_lm import ") or calls.search(line)
        assert is_hook, f"not a hook line: {line!r}"


def test_patch_imports_exist(patch):
    for hunks in patch.values():
        for h in hunks:
            for line in h["added"]:
                if m := re.match(r"from megatron_lighthouse\.megatron_lm import (.+)$", line):
                    for name in (n.strip() for n in m[1].split(",")):
                        assert name in megatron_lm.__all__ and callable(getattr(megatron_lm, name)), name


#: The switch line of each script: pretrain_hybrid.py's forward_step has no local ``args``.
SWITCH_LINE = {"pretrain_gpt.py": "maybe_switch_to_dense(model, args)",
               "pretrain_hybrid.py": "maybe_switch_to_dense(model, get_args())"}
#: The line of each script that builds the model config the hook's start_lighthouse completes.
MODEL_CONFIG_LINE = {"pretrain_gpt.py": "model_cfg = gpt_config_from_args(args)",
                     "pretrain_hybrid.py": "model_cfg = hybrid_config_from_args(args)"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_patch_wires_every_piece(patch, script):
    text = "\n".join(line for h in patch[script] for line in h["added"])
    assert "extra_args_provider=lighthouse_args_provider(add_modelopt_args if has_nvidia_modelopt else None)" in text
    assert "start_lighthouse(args, model_cfg, printer=print_rank_0)" in text
    assert SWITCH_LINE[script] in text


def _hunk_with(patch: dict, script: str, added: str) -> list:
    (hunk,) = [h for h in patch[script] if any(added in line for line in h["added"])]
    return [line.strip() for line in hunk["new"]]


@pytest.mark.parametrize("script", SCRIPTS)
def test_hooks_sit_where_megatron_lm_uses_them(patch, script):
    """The layer spec must reach the model config before Megatron-LM packs it into the config container that
    ``pretrain`` builds the model from (since 0.19 ``gpt_builder`` is not on that path), and the switch must run
    at the top of ``forward_step``, before the batch and the model call."""
    new = _hunk_with(patch, script, "start_lighthouse(")
    start = new.index("start_lighthouse(args, model_cfg, printer=print_rank_0)")
    assert new[start - 1] == MODEL_CONFIG_LINE[script]
    assert new[start + 1] == "full_config = pretrain_cfg_container_from_args(args, model_cfg)"
    new = _hunk_with(patch, script, "maybe_switch_to_dense(")
    switch = new.index(SWITCH_LINE[script])
    assert new[switch - 1] == "timers = get_timers()"
    assert "# Get the batch." in new[switch:]


def test_readme_and_apply_name_the_same_commits():
    for name in ("VERIFIED_COMMIT", "VERIFIED_TAG_COMMIT"):
        commit = re.search(rf"^{name}=([0-9a-f]{{40}})", APPLY.read_text(), re.M)[1]
        assert commit in (PATCHES / "README.md").read_text(), name


# -- apply.sh against a stand-in checkout built from the patch's own context (no Megatron-LM code here) --


def _stand_in(root: pathlib.Path, patch: dict, commit: bool, scripts=SCRIPTS) -> pathlib.Path:
    """A directory whose ``scripts`` hold each hunk's pre-image between filler lines (a git repo if ``commit``)."""
    root.mkdir()
    for path, hunks in patch.items():
        if path not in scripts:
            continue
        lines = []
        for i, h in enumerate(hunks):
            lines += [f"# filler {i}.{j}" for j in range(5)] + h["old"]
        (root / path).write_text("\n".join(lines + ["# end"]) + "\n")
    if commit:
        git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run(git[:3] + ["init", "-q"], check=True)
        subprocess.run(git + ["add", "."], check=True)
        subprocess.run(git + ["commit", "-qm", "stand-in"], check=True)
    return root


def _apply(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(APPLY), *argv], capture_output=True, text=True, env=env, timeout=60)


pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def test_apply_sh_parses():
    assert subprocess.run(["bash", "-n", str(APPLY)]).returncode == 0


def test_apply_then_already_applied(tmp_path, patch):
    root = _stand_in(tmp_path / "mlm", patch, commit=True)
    before = {script: (root / script).read_text() for script in SCRIPTS}
    first = _apply(str(root))
    assert first.returncode == 0, first.stderr
    assert "patch was verified on" in first.stderr  # a different commit is warned about
    assert "applied to pretrain_gpt.py pretrain_hybrid.py: " in first.stdout
    after = {script: (root / script).read_text() for script in SCRIPTS}
    for script in SCRIPTS:
        assert after[script] != before[script] and SWITCH_LINE[script] in after[script]
        assert "start_lighthouse(args, model_cfg, printer=print_rank_0)" in after[script]
    second = _apply(str(root))
    assert second.returncode == 0 and second.stdout.splitlines()[-3:] == [
        f"already applied: {root}/pretrain_gpt.py carries the Lighthouse hook",
        f"already applied: {root}/pretrain_hybrid.py carries the Lighthouse hook", "nothing to do"]
    assert {script: (root / script).read_text() for script in SCRIPTS} == after


def test_apply_completes_a_checkout_patched_before_the_hybrid_hook(tmp_path, patch):
    """A checkout that carries the GPT hook only (an earlier patch): the hybrid one is added, the GPT one kept."""
    root = _stand_in(tmp_path / "mlm", patch, commit=False)
    subprocess.run(["git", "apply", "--include=pretrain_gpt.py", str(PATCH)], cwd=root, check=True)
    gpt = (root / "pretrain_gpt.py").read_text()
    proc = _apply(str(root))
    assert proc.returncode == 0, proc.stderr
    assert f"already applied: {root}/pretrain_gpt.py carries the Lighthouse hook" in proc.stdout
    assert "applied to pretrain_hybrid.py: " in proc.stdout
    assert (root / "pretrain_gpt.py").read_text() == gpt and SWITCH_LINE["pretrain_hybrid.py"] in (
        root / "pretrain_hybrid.py").read_text()


def test_a_checkout_without_pretrain_hybrid_gets_the_gpt_hook(tmp_path, patch):
    root = _stand_in(tmp_path / "mlm", patch, commit=False, scripts=("pretrain_gpt.py",))
    proc = _apply(str(root))
    assert proc.returncode == 0, proc.stderr
    assert f"note: no pretrain_hybrid.py in {root} (a Megatron-LM without HybridModel): its hook is left out" in \
        proc.stderr
    assert "applied to pretrain_gpt.py: " in proc.stdout and not (root / "pretrain_hybrid.py").exists()


def test_conflict_is_refused_and_nothing_changes(tmp_path, patch):
    root = _stand_in(tmp_path / "mlm", patch, commit=False)
    path = root / "pretrain_hybrid.py"  # the GPT script would apply: nothing is changed all the same
    path.write_text(path.read_text().replace("timers = get_timers()", "timers = get_timers(changed=True)"))
    before = {p.name: p.read_text() for p in root.iterdir()}
    proc = _apply(str(root))
    assert proc.returncode == 3
    assert f"does not apply to {root}/pretrain_hybrid.py" in proc.stderr and "git -C" in proc.stderr
    assert "--3way" in proc.stderr
    assert "--spec megatron_lighthouse.env_spec lighthouse_layer_spec" in proc.stderr  # the route of older ones
    assert "not a git checkout" in proc.stderr
    assert {p.name: p.read_text() for p in root.iterdir()} == before


@pytest.mark.parametrize("argv, message", [((), "usage:"), (("/nonexistent/mlm",), "no such directory")])
def test_bad_usage(argv, message):
    proc = _apply(*argv)
    assert proc.returncode == 2 and message in proc.stderr


def test_not_megatron_lm(tmp_path):
    proc = _apply(str(tmp_path))
    assert proc.returncode == 2 and "no pretrain_gpt.py there" in proc.stderr


# -- check_patched.py: its launch-command mode (the Megatron-LM side is run by test_examples.py with a checkout) --


def test_check_patched_reads_a_launch_command(monkeypatch):
    """A printed example line: the VAR=value words go into the environment, the launcher words are dropped."""
    monkeypatch.syspath_prepend(str(PATCHES))
    import check_patched

    for name in ("LIGHTHOUSE_TOPK", "LIGHTHOUSE_DENSE_LAYERS"):
        monkeypatch.setenv(name, "unset")  # restored after the test
    line = ("LIGHTHOUSE_TOPK=1024 LIGHTHOUSE_DENSE_LAYERS=0\\,1 torchrun --nproc-per-node 1 /x/pretrain_gpt.py "
            "--num-layers 2 --spec megatron_lighthouse.env_spec lighthouse_layer_spec")
    assert check_patched.command_arguments([line]) == ("pretrain_gpt.py", [
        "--num-layers", "2", "--spec", "megatron_lighthouse.env_spec", "lighthouse_layer_spec"])
    assert (os.environ["LIGHTHOUSE_TOPK"], os.environ["LIGHTHOUSE_DENSE_LAYERS"]) == ("1024", "0,1")
    assert check_patched.command_arguments(["--num-layers", "2"]) == ("pretrain_gpt.py", ["--num-layers", "2"])
    assert check_patched.command_arguments(["python", "pretrain_gpt.py", "--lr", "1e-3"]) == (
        "pretrain_gpt.py", ["--lr", "1e-3"])
    hybrid = "torchrun /x/pretrain_hybrid.py --hybrid-layer-pattern \\*-\\*- --lr 1e-3"
    assert check_patched.command_arguments([hybrid]) == ("pretrain_hybrid.py", ["--hybrid-layer-pattern", "*-*-",
                                                                                "--lr", "1e-3"])


@pytest.mark.parametrize("argv, message", [
    (("{mlm}", "--"), "usage:"),
    (("{mlm}", "{mlm}"), "usage:"),
    (("{mlm}",), "pretrain_gpt.py is not patched: run patches/apply.sh"),
    (("{mlm}",), "{mlm}/pretrain_hybrid.py is not patched: run patches/apply.sh {mlm} first"),
    (("{mlm}/nope",), "error: MEGATRON_LM_DIR {mlm}/nope: no pretrain_gpt.py there"),
    (("{mlm}/nope", "--", "--lr 1"), "error: MEGATRON_LM_DIR {mlm}/nope: no pretrain_gpt.py there"),
])
def test_check_patched_usage(tmp_path, argv, message):
    _one_line_error(tmp_path, argv, message)


@pytest.mark.parametrize("argv, message", [
    (("{mlm}", "--", "--lr 'x --num-layers 2"), "error: the command cannot be split into words as a shell would (No "
                                                 "closing quotation)"),
    (("{mlm}", "--", "--tensor-model-parallel-size x --num-layers 2"),
     "error: --tensor-model-parallel-size x: must be a positive integer"),
    (("{mlm}", "--", "--context-parallel-size 0 --num-layers 2"),
     "error: --context-parallel-size 0: must be a positive integer"),
])
def test_check_patched_refuses_a_command_it_cannot_read(tmp_path, argv, message):
    """Before Megatron-LM is imported: one line, no traceback."""
    _one_line_error(tmp_path, argv, message)


def _one_line_error(tmp_path, argv, message):
    (tmp_path / "pretrain_gpt.py").write_text("# stand-in\n")
    if "hybrid" in message:
        (tmp_path / "pretrain_gpt.py").write_text("# megatron_lighthouse\n")
        (tmp_path / "pretrain_hybrid.py").write_text("# stand-in\n")
    argv = [a.format(mlm=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, str(PATCHES / "check_patched.py"), *argv], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and message.format(mlm=tmp_path) in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_check_patched_help():
    proc = subprocess.run([sys.executable, str(PATCHES / "check_patched.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python patches/check_patched.py"), proc


def test_check_patched_names_a_checkout_that_does_not_import(tmp_path):
    """A checkout whose megatron.training needs a module this Python lacks: one error line, no traceback."""
    (tmp_path / "pretrain_gpt.py").write_text("# megatron_lighthouse\n")
    (tmp_path / "megatron" / "training").mkdir(parents=True)
    (tmp_path / "megatron" / "__init__.py").write_text("")
    (tmp_path / "megatron" / "training" / "__init__.py").write_text("import a_requirement_not_installed\n")
    proc = subprocess.run([sys.executable, str(PATCHES / "check_patched.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1, proc
    assert proc.stderr.strip() == (f"error: {tmp_path}: its megatron.training does not import in this Python "
                                   "(ModuleNotFoundError: No module named 'a_requirement_not_installed'); install "
                                   "Megatron-LM's requirements here"), proc.stderr


def test_check_patched_output_drops_megatrons_argument_dump_and_links(monkeypatch):
    monkeypatch.syspath_prepend(str(PATCHES))
    import check_patched

    text = ("> PyTorch version 2.13\n------------------------ arguments ------------------------\n  lr ...... 0.1\n"
            "  world_size ...... 1\n-------------------- end of arguments ---------------------\n"
            "WARNING: one_logger package is required; see https://example.invalid/page for details\n"
            "using world size: 1\n")
    assert check_patched.tail_of(text) == "> PyTorch version 2.13\nusing world size: 1\n"
    assert check_patched.tail_of("".join(f"{i}\n" for i in range(40)), lines=3) == "37\n38\n39\n"


def test_check_patched_checks_a_te_command_in_its_local_form(monkeypatch):
    """Without TransformerEngine a TE command (the default --transformer-impl) is checked as the examples write its
    TRANSFORMER_IMPL=local form; FP8 (TE only) is dropped and named."""
    monkeypatch.syspath_prepend(str(PATCHES))
    import check_patched

    te = ["--num-layers", "2", "--transformer-impl", "transformer_engine", "--fp8-format", "hybrid", "--fp8-param-gather",
          "--no-persist-layer-norm", "--bf16"]
    local, dropped = check_patched.local_form(te)
    assert local == ["--num-layers", "2", "--no-persist-layer-norm", "--bf16", "--transformer-impl", "local",
                     "--no-rope-fusion", "--no-gradient-accumulation-fusion"]
    assert dropped == ["--fp8-format", "hybrid", "--fp8-param-gather"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert check_patched.needs_local_form(te) and check_patched.needs_local_form(["--num-layers", "2"])
    assert not check_patched.needs_local_form(["--transformer-impl", "local"])


def test_check_patched_self_check_settings_pay_off(monkeypatch):
    """The self-check's tiny model must not print 'Lighthouse does not pay off here': its subsequence is shorter
    than its sequence."""
    monkeypatch.syspath_prepend(str(PATCHES))
    import check_patched

    from megatron_lighthouse.config import LighthouseConfig

    value = {flag: check_patched.FLAGS[i + 1] for i, flag in enumerate(check_patched.FLAGS[:-1])}
    config = LighthouseConfig(levels=int(value["--lighthouse-levels"]), topk=int(value["--lighthouse-topk"]),
                              pooling_factor=int(value["--lighthouse-pooling-factor"]))
    assert config.attention_cost(int(value["--seq-length"]), 4, 16)["ratio"] < 1

"""The README's user path as written: its test command is the one CI runs, and its op example runs."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_two_commands_and_ci():
    commands = [block.strip() for block in _blocks("bash") if block.strip().startswith("python3 -m venv")]
    assert len(commands) == 2
    demo, tests = commands
    assert demo.endswith("pip install torch==2.13.0 -e . && python -m megatron_lighthouse.demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"TEST_COMMAND='{tests}'" in ci  # CI runs exactly the README's test command
    assert "for version in 3.11 3.12" in ci


def test_the_op_example_runs_and_prints_what_it_says():
    (example,) = [block for block in _blocks("python") if "lighthouse_attention(q, k, v, config=config)" in block]
    proc = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["18432", "0.31640625"]
    assert "18432 entries attended" in example and "0.316" in example


def test_readme_is_short_and_no_diary():
    assert len(README.splitlines()) <= 200
    docs = [README] + [p.read_text() for p in (ROOT / "docs").glob("*.md")]
    assert sum(len(d.splitlines()) for d in docs[1:]) <= 600
    for text in docs:
        assert not re.search(r"\bsessions?\b|\bissue \d", text, flags=re.I)

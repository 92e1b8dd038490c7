"""Every ```python block of README.md runs as written.

The blocks run one after another in one fresh interpreter (one start-up, one import of each
framework), each in its own namespace, from an empty folder outside the source tree; a failure
names the block and its first line in README.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_RUNNER = textwrap.dedent(
    """
    import importlib.util, json, sys, traceback
    # The Keras block loads TensorFlow, the PyTorch block's optimizer then imports triton where torch's wheel
    # ships it: after TensorFlow 2.21 that crashes the process (docs/torch.md, "With TensorFlow in the same
    # process"); imported first, it does not. A reader runs the blocks in separate programs.
    if all(importlib.util.find_spec(m) for m in ("triton", "tensorflow")):
        import triton
    blocks = json.loads(sys.stdin.read())
    for line, source in blocks:
        try:
            exec(compile(source, f"README.md, the block at line {line}", "exec"), {"__name__": "__main__"})
        except BaseException:
            traceback.print_exc()
            sys.exit(f"README.md: the python block at line {line} failed")
    """
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line, source)`` of each fenced ```python block."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S):
        blocks.append((text[: match.start()].count("\n") + 2, match.group(1)))
    return blocks


def test_the_readme_has_python_blocks():
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 3, "the README shows a Keras, a linen and an nnx example"


def test_every_python_block_of_the_readme_runs(tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text())
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_python_blocks_are_found_with_their_lines():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = 2\n")]


def test_the_readmes_main_job_is_the_first_committed_digits_command():
    """The README's first command runs the experiment of results/microbatch-k2 (the figure and numbers it shows),
    with the command results/commands.txt records; every committed result folder has its command there
    (``pytest -m slow`` reruns each and requires the committed summary, tests/test_slow.py)."""
    from digits_results import committed_commands

    commands = committed_commands()
    line = next(
        ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith('pip install -e ".[all]" && ')
    )
    tokens = line.split("renorm-repro run", 1)[1].split()
    assert tokens[:2] == ["--preset", "digits"] and tokens[2] == "--out" and len(tokens) == 4, tokens
    assert commands["microbatch-k2"] == ["--preset", "digits"]
    assert set(commands) == {p.parent.name for p in (ROOT / "results").glob("*/summary.json")}

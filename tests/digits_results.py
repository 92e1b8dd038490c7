"""The committed digits results and the commands that made them (``results/commands.txt``), for the tests."""

from __future__ import annotations

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def committed_commands() -> dict[str, list[str]]:
    """``{folder: option tokens after `run`}`` of every command in results/commands.txt (``--out runs/NAME`` names
    the folder results/NAME; ``--out`` and ``--no-progress`` are left out)."""
    commands = {}
    for line in (REPO / "results" / "commands.txt").read_text().splitlines():
        if not line.startswith("renorm-repro run "):
            continue
        tokens = line.split("#")[0].split()[2:]
        out = tokens.index("--out")
        name = pathlib.PurePosixPath(tokens[out + 1]).name
        commands[name] = [t for i, t in enumerate(tokens) if i not in (out, out + 1) and t != "--no-progress"]
    return commands

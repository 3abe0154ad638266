"""`--help` of every command and subcommand exits 0 and documents its flags.

The command tree is read from the help texts themselves, so a new subcommand is covered without
editing this file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import typing

import pytest

from tuneloop.cli.main import main

_SUBCOMMAND = re.compile(r"^    ([a-z][\w-]*)(?:\s|$)")


def run_help(*words: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*words, "--help"])
        except SystemExit as exc:  # main returns argparse's exit code; nothing may exit instead
            pytest.fail(f"tuneloop {' '.join(words)} --help raised SystemExit({exc.code}) past main")
    assert code == 0, f"tuneloop {' '.join(words)} --help exited {code}: {err.getvalue()[-2000:]}"
    assert "Traceback" not in err.getvalue()
    return out.getvalue()


def subcommands(help_text: str) -> list[str]:
    """Names listed under "positional arguments:" (argparse indents subcommands by four)."""
    _, _, rest = help_text.partition("positional arguments:")
    section = rest.split("\n\n")[0]
    return [m.group(1) for line in section.splitlines() if (m := _SUBCOMMAND.match(line))]


def command_tree() -> list[tuple[str, ...]]:
    seen: list[tuple[str, ...]] = []
    todo: list[tuple[str, ...]] = [()]
    while todo:
        words = todo.pop(0)
        seen.append(words)
        todo.extend((*words, name) for name in subcommands(run_help(*words)))
    return seen


TREE = command_tree()


def test_the_tree_has_every_command() -> None:
    for words in [("serve",), ("generate",), ("feedback", "export"), ("feedback", "import"), ("adapters", "status"),
                  ("trainer", "once"),
                  ("trainer", "run"), ("reward", "score"), ("adapters", "list"), ("adapters", "show")]:  # fmt: skip
        assert words in TREE, f"`tuneloop {' '.join(words)}` was not found from the help texts"


@pytest.mark.parametrize("words", TREE, ids=lambda w: " ".join(w) or "tuneloop")
def test_help_exits_zero(words: tuple[str, ...]) -> None:
    text = run_help(*words)
    assert text.startswith("usage: ")


def _flags(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _flags(hints[f.name])
        else:
            out.append("--" + f.name.replace("_", "-"))
    return out


def test_serve_and_trainer_document_every_setting() -> None:
    from tuneloop.server.config import ServerConfig
    from tuneloop.trainer.config import TrainerConfig

    serve = run_help("serve")
    assert [f for f in _flags(ServerConfig) if f not in serve] == []
    for command in ("once", "run"):
        text = run_help("trainer", command)
        assert [f for f in _flags(TrainerConfig) if f not in text] == []

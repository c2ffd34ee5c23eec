"""`--help` of every command, and building its config, import neither torch nor transformers: the
configs live in torch-free options modules and each command's runner is imported only when it runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lensunlearn.cli import COMMAND_MODULES, all_commands

HEAVY = ("torch", "transformers", "peft", "datasets", "matplotlib")

# Run in a fresh interpreter: this test process has imported torch already.
_PROBE = """
import contextlib, io, json, sys
from lensunlearn.cli import all_commands, console
results = {}
for command in all_commands():
    words = list(command.words)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        console([*words, "--help"])
    results[" ".join(words)] = "--help" in out.getvalue()
import lensunlearn
names = sorted(lensunlearn.__all__)  # listing the public names loads none of them
from lensunlearn import PRESETS, UnlearnConfig
from lensunlearn.search.options import SearchConfig
UnlearnConfig(**vars(PRESETS["small"]))
SearchConfig(unlearn="--examples 8 --eval_tasks a.jsonl", grid=("lr=1e-3,1e-2",))  # builds two unlearn configs
print(json.dumps({"help": results, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)}))
""".replace("HEAVY", repr(HEAVY))


def test_help_and_configs_import_no_torch():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["help"] == {" ".join(c.words): True for c in all_commands()}
    assert report["loaded"] == []


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_command_modules_name_their_runners_lazily(module):
    """Each runner is a "module:function" string that resolves to a function of that name."""
    import importlib

    for command in importlib.import_module(module).COMMANDS:
        assert isinstance(command.run, str) and ":" in command.run, command.words
        target, _, name = command.run.partition(":")
        assert callable(command.runner()) and command.runner().__name__ == name
        assert command.runner().__module__ == target

"""The ``sqlm`` command: ``sqlm <command> [RECIPE.yaml] [--key value ...]``.

Each command lives in its own module of :mod:`sqlm.commands` and exposes ``main(argv) -> int``; it
is imported only when run, so ``sqlm --help`` stays fast. Errors a user can act on
(:class:`sqlm.errors.SqlmError`) print as one line and exit with code 2; ``--debug`` shows the
traceback instead. Under a launcher (``accelerate launch``, ``torchrun``) every process exits with
that code and only the main one (rank 0) prints the line.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping

from .errors import SqlmError


COMMANDS = {
    "train": ("sqlm.commands.train", "fine-tune a causal LM with a soft-Q / path-consistency loss"),
    "reward": ("sqlm.commands.reward", "train a Bradley-Terry reward model on preference data"),
    "dpo": ("sqlm.commands.dpo", "train TRL's DPO baseline on the data of a paired sqlm recipe"),
    "grpo": ("sqlm.commands.grpo", "train TRL's GRPO baseline on the prompts and reward of a paired sqlm recipe"),
    "rloo": ("sqlm.commands.rloo", "train TRL's RLOO baseline on the prompts and reward of a paired sqlm recipe"),
    "online_dpo": (
        "sqlm.commands.online_dpo",
        "train TRL's online DPO baseline on the prompts and reward of a paired sqlm recipe",
    ),
    "generate": ("sqlm.commands.generate", "decode with a model's own values: sampling, best-of-N, value-guided beam"),
    "eval": ("sqlm.commands.eval", "score models: gold reward, KL, win rate, diversity"),
    "pipeline": ("sqlm.commands.pipeline", "run the embedded gold-reward task end to end vs DPO"),
    "oracle": ("sqlm.commands.oracle", "solve a tiny token MDP exactly and train a tiny LM towards it"),
}


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this is the main process of a launch: global rank 0 (``RANK``, else ``LOCAL_RANK``), or
    not launched by a distributed launcher at all."""
    env = os.environ if environ is None else environ
    for key in ("RANK", "LOCAL_RANK"):
        value = str(env.get(key, "")).strip()
        if value:
            try:
                return int(value) == 0
            except ValueError:
                return True
    return True


def _usage() -> str:
    lines = ["usage: sqlm <command> [RECIPE.yaml] [--key value ...] [--debug]", "", "commands:"]
    for name, (_, help_) in COMMANDS.items():
        lines.append(f"  {name:<10} {help_}")
    lines += ["", "Run 'sqlm <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"sqlm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"sqlm: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except SqlmError as e:
        if debug:
            raise
        if is_main_process():  # every process of a launch fails alike: say it once
            print(f"sqlm {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if is_main_process():
            print(f"sqlm {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``sqlm`` commands, one module each (``sqlm.commands.train`` is ``sqlm train``, ...).

Each exposes ``main(argv) -> int`` and ``recipe_dataclasses()``, the config classes its recipe parses
into, as TRL's ``trl/scripts/``. The library (trainer, losses, data, rewards, evaluation) imports
nothing from here; ``sqlm.cli`` imports a command only when it runs.
"""

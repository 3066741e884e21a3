"""The ``sqlm`` commands: one module per command, each exposing ``main(argv) -> int``."""

"""``python -m training ...``: the training commands without the ``sonocase`` entry point."""

from training.cli import main

main(prog_name="python -m training")

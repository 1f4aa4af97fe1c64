"""``python -m lightning_stthree`` is the ``stthree`` command."""

from lightning_stthree.recipes.cli import run

if __name__ == "__main__":
    run()

"""``python -m lightning_stthree`` is the ``stthree`` command."""

from lightning_stthree.cli import run

if __name__ == "__main__":
    run()

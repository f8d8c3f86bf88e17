"""``python -m saescope`` (and ``torchrun ... -m saescope train ...``): the command-line interface."""

from saescope.cli import app

if __name__ == "__main__":
    app()

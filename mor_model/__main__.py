"""``python -m mor_model ...`` = the ``mor-sr`` command (see :mod:`mor_model.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""The ``mor-sr`` command line (also ``python -m mor_model``): one module per subcommand
(:mod:`.upscale`, :mod:`.route_stats`, :mod:`.eval`, :mod:`.train`), the shared options in
:mod:`.common`, and :func:`main` in :mod:`.main`."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]

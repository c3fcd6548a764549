"""Subcommands of the ``edge`` command line; each module offers ``register(subparsers)``."""

"""The box's verbs of the ``edge`` command line: ``run``, ``model``, ``keys`` and ``ota``.

Each module offers ``register(subparsers)`` and imports what its verb needs only when it runs, so ``edge --help``
stays fast. The fleet's verbs live in ``edge.fleet.cli``.
"""

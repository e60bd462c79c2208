"""The ``stagetune`` command line (``stagetune.cli.main``) and the demo it runs.

The top layer: it starts the server and the worker, each imported only by the command
that needs it, so the client commands work with the base install alone."""

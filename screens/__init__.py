"""The Textual console: one mode per top-level screen (dashboard, matrix, curves, nodes, log), each
rendering what its controller (``screens.controllers``, Textual-free) prepares.

Build the app with :func:`screens.app.make_app`; the CLI and the tests use the same factory.
"""

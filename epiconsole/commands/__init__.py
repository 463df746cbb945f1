"""One module per CLI subcommand: ``HELP``, ``configure(parser)``, ``run(args) -> int``."""

"""The ``keye`` command line: one console script, one module per subcommand under ``keye.cli``."""

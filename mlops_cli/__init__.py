"""The ``mlops`` command line: parses arguments, loads settings once, runs flows."""

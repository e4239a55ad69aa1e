"""The ``ctmask`` command line (typer)."""

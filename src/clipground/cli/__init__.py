"""The ``clipground`` command line (typer)."""

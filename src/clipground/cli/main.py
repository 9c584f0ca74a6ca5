"""Entry point of the ``clipground`` command.

Each subcommand family lives in its own module with a ``register(app)`` function, listed
in ``_COMMAND_MODULES``. User errors (:class:`~clipground.errors.ClipgroundError`) are
printed as one line on stderr with a non-zero exit, never as a traceback; control
characters in the message (from a file name or a phrase) are shown escaped
(:func:`~clipground.phrases.printable`), so a message cannot drive the terminal.
"""

from __future__ import annotations

import importlib
import sys

import typer

from ..errors import ClipgroundError
from ..phrases import printable

app = typer.Typer(
    name="clipground",
    help="Visual grounding with CLIP: an image and a phrase in, the box it means out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Subcommand modules; each defines register(app: typer.Typer) -> None.
_COMMAND_MODULES = [
    "clipground.cli.predict",
    "clipground.cli.train",
    "clipground.cli.evaluate",
    "clipground.cli.demo",
    "clipground.cli.world",
    "clipground.cli.cache",
    "clipground.cli.pretrain",
    "clipground.cli.serve",
    "clipground.cli.export",
]

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Run the CLI, turning user errors into one clear line and exit code 2."""
    import torch

    # Denormal floats count as zero on the CPU. Set before torch starts its worker threads
    # (they inherit the setting; set later it reaches the calling thread only): trained
    # attention/softmax layers produce denormals, and x86 arithmetic on them is far slower.
    torch.set_flush_denormal(True)
    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into a returned 130 when not standalone
            raise KeyboardInterrupt
    except ClipgroundError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors arrive here with standalone_mode=False
        import click

        try:  # typer >= 0.20 vendors click as typer._click: its usage errors are not click's
            from typer._click import ClickException as TyperClickException
        except ImportError:  # pragma: no cover - older typer uses click itself
            TyperClickException = click.ClickException
        if isinstance(e, (click.exceptions.Exit, typer.Exit)):
            sys.exit(e.exit_code)
        if isinstance(e, (click.ClickException, TyperClickException)):
            if isinstance(getattr(e, "message", None), str):
                e.message = printable(e.message)  # it may quote an argument verbatim
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, (click.exceptions.Abort, typer.Abort)):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()

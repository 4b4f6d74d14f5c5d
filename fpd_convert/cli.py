"""The ``fpd-convert`` command line: thin click commands over the library."""
from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fpd-convert")
def main():
    """Compress trained recommender models with tensor-train (TT) embedding tables."""


if __name__ == "__main__":
    main()

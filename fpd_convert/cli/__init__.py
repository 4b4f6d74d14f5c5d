"""The ``fpd-convert`` command line: thin click commands over the library.

``fpd_convert.cli.main`` is the group; the commands live beside it, one module a kind of work
(:mod:`.model_commands`: compress, inspect, decompress, export; :mod:`.data_commands`: synth, train,
finetune, report, demo; :mod:`.bench_command`), with the options they share in :mod:`.options`.  Every
command parses options and calls one library function; nothing here is imported by the library.
"""
from __future__ import annotations

from .group import main
from . import bench_command, data_commands, model_commands  # noqa: E402,F401  (their commands join main)

__all__ = ["main"]

"""The listing commands' output options, defined once: ``-o/--output {table,json}`` (``--json`` stays its alias)
and ``--no-header``/``--noheader``, as squeue, sacct and systemctl users type them.

Commands read ``args.json`` as before (``-o json`` sets it, ``-o table`` clears it) and ``args.no_header``.
"""

import argparse

FORMATS = ("table", "json")


class _Output(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.json = values == "json"


def add_output_options(c, header=True):
    """``-o/--output`` on parser ``c``; ``--no-header`` too where its table has a header row (``header``)."""
    c.add_argument("-o", "--output", choices=FORMATS, action=_Output, default="table",
                   help="table (default) or json (the same as --json)")
    if header:
        c.add_argument("--no-header", "--noheader", dest="no_header", action="store_true",
                       help="leave out the column header row (for scripts, like squeue --noheader)")

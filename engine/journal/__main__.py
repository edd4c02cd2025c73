"""``python -m engine.journal``: the journal commands without the gateway's CLI."""

import argparse
import sys

from gateway._journal_cli import add_journal_commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.journal")
    sub = parser.add_subparsers(dest="command", required=True)
    add_journal_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

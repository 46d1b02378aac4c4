"""Command-line interface: ``diffattr demo | train | generate | featurize | score | report``."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from diffattr.errors import DiffattrError

Handler = Callable[[argparse.Namespace], dict[str, Any]]
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def build_parser() -> argparse.ArgumentParser:
    from diffattr.commands.options import add_common_options

    parser = argparse.ArgumentParser(
        prog="diffattr",
        description="Which training images made a diffusion model produce this image?",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
              diffattr demo --out runs/demo
              diffattr train --data digits --out runs/digits --steps 3000
              diffattr generate runs/digits --num 16
            """
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str, examples: str, handler: Handler) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        add_common_options(p)
        return p

    from diffattr.commands import register_all

    register_all(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from diffattr.config import apply_config

    def _report(exc: DiffattrError) -> None:
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        apply_config(parser, argv)  # --config FILE: option defaults; flags still override
    except DiffattrError as exc:
        if "--debug" in argv:
            raise
        _report(exc)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        if args.threads is not None and args.threads < 1:
            raise DiffattrError(f"--threads must be at least 1, got {args.threads}")
        from diffattr.threads import configure_threads

        configure_threads(args.threads)
        summary = args.handler(args)
    except DiffattrError as exc:
        if args.debug:
            raise
        _report(exc)
        return 2
    except OSError as exc:  # environment trouble not caught closer to its cause
        if args.debug:
            raise
        from diffattr.errors import storage_error

        where = exc.filename if exc.filename is not None else "a file"
        if exc.errno is not None and exc.errno in _WRITE_ERRNOS:
            _report(storage_error(where, exc))
        else:
            _report(DiffattrError(f"{where}: {exc.strerror or exc}"))
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    elif not args.quiet:
        for key, value in summary.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                value = f"{len(value)} entries (--json prints them)"
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``diffattr data``: set-up of built-in data that does not ship with an installed package."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_data_install(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.data import emoji

    path = emoji.install(args.from_file)
    _, entries = emoji.load_rgba()
    return {"dataset": "emoji", "path": str(path), "images": len(entries)}


def _data_without_step(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.errors import ConfigError

    raise ConfigError("diffattr data needs a step", hint="diffattr data install emoji")


def register(add) -> None:
    from diffattr.commands.options import add_common_options

    p = add(
        "data",
        "install built-in data sets that come from a package registry (once, at set-up)",
        """
        diffattr data install emoji
        diffattr data install emoji --from emoji-datasource-google-16.0.0.tgz
        """,
        _data_without_step,
    )
    sub = p.add_subparsers(dest="data_command", metavar="STEP")
    i = sub.add_parser(
        "install",
        help="install a data set (emoji: `npm pack` of the pinned package, checksum verified)",
        description="Install the built-in colour data set 'emoji': Noto Emoji from "
        "emoji-datasource-google@16.0.0 (Apache-2.0 images, MIT metadata), fetched with "
        "`npm pack`, checked against its pinned sha256, decoded once into "
        "$DIFFATTR_DATA_DIR (default ~/.cache/diffattr) with both licences beside it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.set_defaults(handler=cmd_data_install)
    add_common_options(i)
    i.add_argument("dataset", choices=["emoji"], help="the data set to install")
    i.add_argument(
        "--from", dest="from_file", default=None, metavar="TGZ",
        help="the package's tarball, already downloaded (else `npm pack` fetches it)",
    )  # fmt: skip

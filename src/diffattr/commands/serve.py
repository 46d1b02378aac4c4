"""``diffattr serve``: the run's index behind a local web page and JSON API
(:mod:`diffattr.serve`)."""

from __future__ import annotations

import argparse
from typing import Any

from diffattr.commands.options import (
    add_index_args,
    attributor_kwargs,
    feature_settings,
    one_method,
    screen_from_args,
)
from diffattr.errors import ConfigError, DiffattrError


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from diffattr.run import RunDir

    try:
        import uvicorn

        from diffattr.serve.app import make_app
    except ImportError as exc:
        raise DiffattrError(
            f"diffattr serve needs a web stack that is not installed ({exc.name})",
            hint="pip install 'diffattr[serve]' (starlette and uvicorn)",
        ) from None
    if args.k < 1:
        raise ConfigError(f"--k must be at least 1, got {args.k}")
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    method, given = one_method(args)
    index_kwargs = {
        "settings": feature_settings(args),
        "screen": screen_from_args(args),
        **attributor_kwargs(args),
    }
    app = make_app(
        RunDir(args.run), method, given, index_kwargs, args.k, int(args.max_upload_mb * 2**20)
    )
    print(f"serving {args.run} ({method}) on http://{args.host}:{args.port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return {}


def register(add) -> None:
    p = add(
        "serve",
        "a local web page and JSON API: drop in an image, see which training images made it",
        """
        diffattr serve runs/digits                      # http://127.0.0.1:8000/
        diffattr serve runs/digits --port 8765 --method dtrak
        """,
        cmd_serve,
    )
    p.add_argument("run", help="run directory (its index is built first when missing)")
    p.add_argument("--method", default="das", help="the method answering (default: das)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, "
                   "this machine only)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--k", type=int, default=10, help="proponents and opponents shown")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="upload limit in MiB")
    add_index_args(p)

"""``latentdiff serve MODEL_DIR``: the web UI on one machine, safe by default.

It binds to 127.0.0.1 unless told otherwise; any address another machine can reach needs ``--auth
USER:PASSWORD``, and both are checked before gradio or the model is loaded. Gradio's analytics and share
links are off, uploads are capped in bytes (here) and in pixels (latentdiff.ui.studio.load_upload).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from latentdiff.cli import positive_float

PROG = "latentdiff serve"
INSTALL_HINT = 'the web UI needs gradio, the ui extra: pip install -e ".[ui]"'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="A web UI for a pipeline folder: text-to-image, img2img, inpainting, a gallery of "
        "PNGs that carry their settings, and the validation grids and loss curves of training runs.",
    )
    parser.add_argument("model_dir", help="a pipeline folder (model_index.json + components)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (default 127.0.0.1: this machine only); any other needs --auth")
    parser.add_argument("--port", type=port_number, default=7860)
    parser.add_argument("--auth", metavar="USER:PASSWORD", default=None,
                        help="require this login (the password is visible to other users of this machine in its "
                             "process list; prefer a machine of your own)")
    parser.add_argument("--outdir", default=None,
                        help="where generated PNGs are kept (default: a new temporary folder)")
    parser.add_argument("--max_upload_mb", type=positive_float, default=20.0, help="the largest upload, in MB")
    return parser


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 1 to 65535, got {value}")
    return value


def parse_auth(text: str) -> tuple[str, str]:
    """``USER:PASSWORD`` -> (user, password); the password may contain ":", neither part may be empty."""
    user, colon, password = text.partition(":")
    if not colon or not user or not password:
        raise ValueError("--auth must be USER:PASSWORD, both non-empty (e.g. --auth alice:correct-horse)")
    return user, password


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach; a host name other than localhost is not trusted to be one."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, auth: tuple[str, str] | None) -> None:
    if not is_loopback(host) and auth is None:
        raise ValueError(
            f"--host {host} lets other machines reach the UI: pass --auth USER:PASSWORD too, or keep the default "
            "--host 127.0.0.1 (this machine only)"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        auth = None if args.auth is None else parse_auth(args.auth)
        check_host(args.host, auth)
        try:
            from latentdiff.ui.app import build_app, launch
        except ImportError as error:
            if (error.name or "").partition(".")[0] not in ("gradio", "pandas"):
                raise
            raise ValueError(INSTALL_HINT) from None
        from latentdiff.ui.studio import Studio

        studio = Studio(args.model_dir, outdir=args.outdir)
        print(f"{PROG}: {studio.model_dir}, images saved in {studio.outdir}", file=sys.stderr)
        launch(build_app(studio), studio, args.host, args.port, auth, args.max_upload_mb)
    except (ValueError, FileNotFoundError, OSError) as error:  # OSError: the port is taken, a folder unwritable
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0

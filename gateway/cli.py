"""The `flowgate` command: `serve`, `check FILE`, `status`, `--version`.

Exit codes: 0 fine; 1 the gateway could not run (e.g. the port is taken), or `status` could not read the admin
port; 2 bad usage, config or store URI (one line on stderr naming the problem, never a traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import BUILD, __version__
from .config import ConfigProblems, check_config_file, load_settings, unknown_env_vars
from .errors import ConfigError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

_SERVE_FLAGS = (
    ("--upstream", "URL", "the app to forward to, e.g. http://127.0.0.1:8000 (env FLOWGATE_UPSTREAM)"),
    ("--store", "URI", "memory:// (default), redis://[user:pass@]host:port/db, rediss://…, redis+cluster://…"),
    ("--config", "FILE", "TOML config file (env FLOWGATE_CONFIG)"),
    ("--host", "HOST", "proxy address (default 127.0.0.1)"),
    ("--port", "PORT", "proxy port (default 8080)"),
    ("--admin-host", "HOST", "admin address (default 127.0.0.1)"),
    ("--admin-port", "PORT", "admin port (default 8081)"),
    ("--admin-token", "TOKEN", "bearer token for the admin port (env FLOWGATE_ADMIN_TOKEN)"),
    ("--max-keys", "N", "live flow-control keys tracked before new ones get 429 too_many_keys (default 100000)"),
    ("--workers", "N", "worker processes sharing the port (default 1; N > 1 needs a Redis store)"),
    ("--log-level", "LEVEL", "critical, error, warning, info (default), debug or trace"),
    ("--log-format", "FORMAT", "text (default) or json: one JSON object per line (env FLOWGATE_LOG_FORMAT)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowgate",
        description="Self-hosted flow-control gateway: per-key parallelism and rate limits that hold, not reject.",
    )
    parser.add_argument("--version", action="version", version=f"flowgate {__version__} ({BUILD})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Precedence: flag > environment (FLOWGATE_*) > config file > default.",
    )
    for flag, metavar, text in _SERVE_FLAGS:
        serve.add_argument(flag, metavar=metavar, help=text)
    check = commands.add_parser("check", help="validate a config file", description="Validate a config file.")
    check.add_argument("file", metavar="FILE")
    status = commands.add_parser(
        "status",
        help="show the keys of a running gateway",
        description="Show the flow-control keys of a running gateway, read from its admin port.",
    )
    status.add_argument("--admin", metavar="URL", help="admin port URL (env FLOWGATE_ADMIN_URL; http://127.0.0.1:8081)")
    status.add_argument("--token", metavar="TOKEN", help="admin bearer token (env FLOWGATE_ADMIN_TOKEN)")
    status.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    status.add_argument("--interval", metavar="SECONDS", type=_interval, default=2.0, help="--watch period (2)")
    status.add_argument("--limit", metavar="N", type=_positive, default=50, help="keys shown, by backlog (50)")
    status.add_argument("--search", metavar="PREFIX", default="", help="only keys starting with PREFIX")
    return parser


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be a number of seconds, got "{text}"') from None
    if not 0.5 <= value <= 60:
        raise argparse.ArgumentTypeError(f"must be from 0.5 to 60 seconds, got {text}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise argparse.ArgumentTypeError(f'must be an integer from 1 to 100000, got "{text}"')
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return _check(args.file)
    if args.command == "status":
        from .status import run  # rich and httpx load only for this command

        return run(
            args.admin, args.token, watch=args.watch, interval=args.interval, limit=args.limit, search=args.search
        )
    return _serve(args)


def _check(path: str) -> int:
    problems = check_config_file(path)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    print(f"{path}: OK")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    flags = {flag.lstrip("-").replace("-", "_"): None for flag, _, _ in _SERVE_FLAGS}
    flags = {name: getattr(args, name) for name in flags}
    try:
        settings = load_settings(flags)
    except ConfigProblems as exc:
        hint = f"; run `flowgate check {exc.problems[0].where.split(':')[0]}` to list them" if _from_file(exc) else ""
        print(f"flowgate: {exc}{hint}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        print(f"flowgate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from .server import serve  # uvicorn and the proxy load only when serving

    for name in unknown_env_vars():
        print(f"flowgate: warning: {name} is not a Flowgate setting; ignored", file=sys.stderr)
    return serve(settings)


def _from_file(exc: ConfigProblems) -> bool:
    return len(exc.problems) > 1 and all(not p.where.startswith(("FLOWGATE_", "--")) for p in exc.problems)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`casedesk serve | check-config | --version`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

from casedesk import __version__
from casedesk.config import ConfigError, load, split_host_port
from casedesk.ops.logsink import OperatorLogHandler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="casedesk", description="Anthropic Messages API gateway for llama.cpp servers"
    )
    parser.add_argument("--version", action="version", version=f"casedesk {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="path to the TOML config")
    serve.add_argument("--listen", help="HOST:PORT, overrides [server].listen")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    check = commands.add_parser("check-config", help="check a config file and explain every problem")
    check.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.path)
    return serve_command(args)


def check_config(path: str) -> int:
    try:
        config = load(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    models = sum(len(d.models) for d in config.deployments.values())
    print(f"{path}: OK ({len(config.deployments)} deployment(s), {models} model tag(s))")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[OperatorLogHandler(os.dup(sys.stderr.fileno()))],  # never blocks; values escaped (issue 22)
    )
    try:
        config = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            logging.error("config: %s", problem)
        return 2
    if args.listen:
        try:
            host, port = split_host_port(args.listen)
        except ValueError as exc:
            logging.error("--listen: %s", exc)
            return 2
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, listen_host=host, listen_port=port)
        )
    from casedesk.ops.process import SupervisorError
    from casedesk.ops.systemd import listen_fds
    from casedesk.lifecycle import run

    try:
        activated = listen_fds()  # systemd socket activation: listen where we are told
        _run_loop(run(config, sock=activated[0] if activated else None))
    except SupervisorError as exc:
        logging.error("%s", exc)
        return 1
    except OSError as exc:
        logging.error(
            "cannot listen on %s:%d: %s", config.server.listen_host, config.server.listen_port, exc.strerror or exc
        )
        return 1
    return 0


def _run_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (the `fast` extra), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)

"""`feedloop serve`: run the gRPC server until SIGTERM/SIGINT, then drain and exit 0.

Prints exactly one line to stdout once serving (tests, the demo and the soak parse it):
    feedloop serve: listening grpc=HOST:PORT metrics=HOST:PORT live=VERSION auth=on|off
(with ` http=HOST:PORT` at the end when the OpenAI-compatible HTTP API is on). Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from feedloop.core.config import add_config_flags, config_from_args
from feedloop.core.errors import FeedloopError
from feedloop.core.logs import configure_logging
from feedloop.server.app import FeedloopServer
from feedloop.server.config import ServeConfig

EXAMPLES = """examples:
  feedloop serve                                   # embedded: SQLite store, local registry
  feedloop serve --port 0 --metrics-port 0         # free ports, printed on the first line
  feedloop serve --http-port 8000                  # also the OpenAI-compatible HTTP API
  feedloop serve --host 0.0.0.0 --auth-keys-file keys.toml --tls-cert c.pem --tls-key k.pem
  feedloop serve --store postgresql://postgres@127.0.0.1/test --registry postgresql://...
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="feedloop serve",
        description="Serve the live policy over gRPC: batched generation, durable feedback, "
        "hot swap, health, auth and Prometheus metrics.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="TOML", help="config file (its [serve] table)")
    add_config_flags(parser, ServeConfig)
    return parser


async def serve(config: ServeConfig) -> int:
    server = FeedloopServer(config)
    try:
        await server.start()
    except (FeedloopError, OSError) as exc:
        print(f"feedloop serve: {exc}", file=sys.stderr, flush=True)
        await server.stop(0.0)
        return 1
    print(server.banner(), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("feedloop.server").info("draining (grace %.1fs)", config.shutdown_grace_s)
    await server.stop(config.shutdown_grace_s)
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv[1:])
    try:
        config = config_from_args(ServeConfig, args, section="serve")
    except FeedloopError as exc:
        print(f"feedloop serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))

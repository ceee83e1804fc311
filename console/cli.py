"""`feedloop console`: serve the rating and evaluation console until interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from aiohttp import web

from feedloop.console.app import build_app
from feedloop.console.config import ConsoleConfig, load_console_config


async def serve(config: ConsoleConfig, stop: asyncio.Event) -> None:
    runner = web.AppRunner(build_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(
        f"feedloop console: listening http://{host}:{port} target={config.target} "
        f"admin={'on' if config.admin_key else 'off'}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


async def _main(config: ConsoleConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await serve(config, stop)


def main(argv: list[str]) -> int:
    try:
        config = load_console_config(argv[1:])
    except (ValueError, OSError) as exc:
        print(f"feedloop console: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_main(config))
    return 0

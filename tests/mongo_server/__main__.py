"""Run the MongoDB test double by hand: `python -m tests.mongo_server --port 27017`."""

from __future__ import annotations

import argparse
import asyncio

from .server import MongoTestServer


async def _main(host: str, port: int) -> None:
    server = MongoTestServer(host=host, port=port)
    await server.start()
    print(f"mongo test server (a test double) on {server.url}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=27017)
    args = parser.parse_args()
    try:
        asyncio.run(_main(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

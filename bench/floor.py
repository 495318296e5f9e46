"""The ceiling on the upload ratio of bench/benchmark.py on this machine: how fast the
limit converts while the same CPUs also receive the uploads, and what receiving costs.

    python bench/floor.py [--seconds 4] [--workers N]

A bare aiohttp app (one handler: read the body in 256 KiB chunks, as the real server
does, and answer 201 with a small JSON object) runs as a subprocess on loopback. The
benchmark's load generator sends it uploads at 90% of the limit's rate while the limit's
processes convert, as in bench/benchmark.py. No server can convert faster than the limit
does then, since it must receive every upload too; "ceiling" is that rate over the
limit's own. The CPU the bare app and the load generator spend per upload is printed too:
the real server's CPU per upload, printed by bench/benchmark.py, less the bare app's is
what storing an image costs beyond receiving it.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from aiohttp import web
from benchmark import CPUS, in_process_limit, sample_images, uploader
from common import start_python, tree_cpu
from loadgen import Pool

from asgilook_aiohttp.config import default_workers


async def _accept(request: web.Request) -> web.Response:
    async for _ in request.content.iter_chunked(256 * 1024):  # as the real server reads
        pass
    return web.json_response({"id": "00000000-0000-4000-8000-000000000000"}, status=201)


async def serve() -> None:
    app = web.Application()
    app.router.add_post("/images", _accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"bare server on http://{host}:{port}", flush=True)
    await asyncio.Event().wait()


async def paced_uploads(pool: Pool, data: bytes, rate: float, stop: asyncio.Event) -> int:
    """Upload ``data`` ``rate`` times a second, at most 16 at once, until ``stop``."""
    upload = uploader(pool, data)
    started = time.perf_counter()
    sent: list[asyncio.Future[None]] = []
    running: set[asyncio.Future[None]] = set()
    while not stop.is_set():
        due = int((time.perf_counter() - started) * rate) + 1 - len(sent)
        for _ in range(min(due, 16 - len(running))):
            task = asyncio.ensure_future(upload())
            sent.append(task)
            running.add(task)
            task.add_done_callback(running.discard)
        # Waking in batches, not once an upload, keeps this loop's own CPU low.
        await asyncio.sleep(0.005)
    await asyncio.gather(*sent)  # any upload that failed fails the run
    return len(sent)


async def main(seconds: float, workers: int) -> None:
    server = await start_python(__file__, "--serve")
    pool = Pool(server.url)
    print(f"{workers} workers' worth of limit on {CPUS} CPUs; uploads at 90% of the limit")
    print(
        f"{'upload':<11} {'server ms':>9} {'client ms':>9} {'limit/s':>8} "
        f"{'loaded/s':>9} {'ceiling':>8}"
    )
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for name, data in sample_images().items():
                before = await asyncio.to_thread(
                    in_process_limit, data, seconds, workers, Path(scratch)
                )
                stop = asyncio.Event()
                # The load generator is this event loop's thread; the limit runs on others.
                server_before, client_before = tree_cpu(server.process.pid)[0], time.thread_time()
                sending = asyncio.create_task(paced_uploads(pool, data, 0.9 * before, stop))
                loaded = await asyncio.to_thread(
                    in_process_limit, data, seconds, workers, Path(scratch)
                )
                stop.set()
                count = await sending
                server_ms = (tree_cpu(server.process.pid)[0] - server_before) / count * 1e3
                client_ms = (time.thread_time() - client_before) / count * 1e3
                after = await asyncio.to_thread(
                    in_process_limit, data, seconds, workers, Path(scratch)
                )
                limit = (before + after) / 2
                print(
                    f"{name:<11} {server_ms:9.2f} {client_ms:9.2f} {limit:8.1f} "
                    f"{loaded:9.1f} {loaded / limit:8.2f}"
                )
    finally:
        pool.close()
        await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each load run")
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="the limit's processes"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve:
        asyncio.run(serve())
    else:
        asyncio.run(main(arguments.seconds, arguments.workers))

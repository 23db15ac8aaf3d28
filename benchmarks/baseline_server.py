"""The one-hop baseline: an aiohttp handler that pushes the body to Redis and awaits the reply.

No signature check, no api_entry, no envelope: the least an HTTP-to-Redis-to-worker hop can
cost in Python. It speaks goinfer's queue format (goinfer.queue) so the same `goinfer server`
dispatcher answers it, and the benchmark can report goinfer's HTTP tier as a ratio of this.

    python -m benchmarks.baseline_server --port 18100 --redis 127.0.0.1:16379 --stream q0 [--reuse-port]
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import cast

import click
import redis.asyncio
import uvloop
from aiohttp import web

from goinfer.queue import JOB_FIELD, Job, Reply, reply_key

TIMEOUT_S = 10.0
DRAIN_BATCH = 256


def make_app(redis_url: str, stream: str, api: str) -> web.Application:
    client = redis.asyncio.Redis.from_url(redis_url)
    reader = redis.asyncio.Redis.from_url(redis_url)
    replies = reply_key(f"baseline-{uuid.uuid4().hex}", 0)
    waiting: dict[str, asyncio.Future[Reply]] = {}

    async def read_replies() -> None:
        while True:
            item = await reader.blpop([replies], timeout=1)
            if item is None:
                continue
            rest = cast("list[bytes] | None", await reader.lpop(replies, DRAIN_BATCH))  # LPOP with a count: a list
            for raw in [item[1], *(rest or [])]:
                reply = Reply.decode(raw)
                future = waiting.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result(reply)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        job_id = uuid.uuid4().hex
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        waiting[job_id] = future
        job = Job(job_id, api, json.loads(body).get("data", {}), replies, time.time() + TIMEOUT_S)
        await client.xadd(stream, {JOB_FIELD: job.encode()})
        try:
            reply = await asyncio.wait_for(future, TIMEOUT_S)
        finally:
            waiting.pop(job_id, None)
        return web.Response(body=json.dumps({"code": reply.code, "data": reply.data}, separators=(",", ":")).encode(),
                            content_type="application/json")

    async def lifecycle(app: web.Application):
        task = asyncio.get_running_loop().create_task(read_replies())
        yield
        task.cancel()

    app = web.Application()
    app.router.add_post(api, handle)
    app.cleanup_ctx.append(lifecycle)
    return app


@click.command()
@click.option("--port", type=int, required=True)
@click.option("--redis", "redis_address", required=True)
@click.option("--stream", required=True)
@click.option("--api", default="/api/echo")
@click.option("--reuse-port", is_flag=True)
def main(port: int, redis_address: str, stream: str, api: str, reuse_port: bool) -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(make_app(f"redis://{redis_address}", stream, api), host="127.0.0.1", port=port,
                print=None, access_log=None, reuse_port=reuse_port or None)


if __name__ == "__main__":
    main()

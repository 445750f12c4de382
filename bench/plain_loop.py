"""The plain client the pace benchmarks compare the pipeline with.

    python bench/plain_loop.py --base-url http://127.0.0.1:8765 --op face-swap \\
        --inputs DIR --template T.jpg --out OUT --concurrency 64 --poll-interval 0.1

The simplest correct loop over a vendor's API with aiohttp and a semaphore: for every
``*.jpg`` in ``--inputs`` (sorted), send the same requests the pipeline sends, poll
every ``--poll-interval`` until the task ends, download the result and write it to
``OUT/<name>`` (no fsync, no journal, no retry budget, no dedupe). At most
``--concurrency`` items are in flight; tasks are created only as slots free up, so
memory stays flat however many inputs there are. A 429, a 5xx or a dropped connection
is retried after ``--retry-sleep`` seconds, up to ``--attempts`` times a request.

``--skip-existing`` skips an input whose output file is already there (the plain
loop's "rerun"). Keys come from ``AILAB_API_KEY`` and ``PERFECTCORP_API_KEY``.
``--summary FILE`` receives the counts as JSON.

Deliberately independent of the ``pipeline`` package: aiohttp and the standard
library only, so it measures what the protocol itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

AILAB_SUBMIT = {
    "face-swap": "/api/portrait/editing/ai-face-swap",
    "emotion-editor": "/api/portrait/effects/emotion-editor",
}
AILAB_POLL = "/api/common/query-async-task-result"
PC_FILE = "/s2s/v2.0/file/ai-smile"
PC_TASK = "/s2s/v2.0/task/ai-smile"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ItemFailed(Exception):
    """The vendor refused or failed this item; counted, the loop goes on."""


class Loop:
    def __init__(self, args: argparse.Namespace, session: aiohttp.ClientSession) -> None:
        self.args = args
        self.base = args.base_url.rstrip("/")
        self.session = session
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.retries = 0
        self.errors: Counter[str] = Counter()
        self.template = args.template.read_bytes() if args.template else b""
        self.ailab_headers = {"ailabapi-api-key": os.environ.get("AILAB_API_KEY", "")}
        self.pc_headers = {"Authorization": f"Bearer {os.environ.get('PERFECTCORP_API_KEY', '')}"}

    async def call(
        self, kind: str, send: Callable[[], Awaitable[tuple[int, bytes]]]
    ) -> tuple[int, bytes]:
        """One request, retried on 429/5xx/disconnects; returns (status, body)."""
        for attempt in range(self.args.attempts):
            self.requests[kind] += 1
            try:
                status, body = await send()
            except (aiohttp.ClientError, TimeoutError):
                status, body = 0, b""
            self.statuses[status] += 1
            # AILab says "out of credits" with a 429 (ERROR_NOT_ENOUGH_CREDITS): no retry.
            if (status not in RETRY_STATUSES and status != 0) or b"NOT_ENOUGH_CREDITS" in body:
                return status, body
            if attempt + 1 < self.args.attempts:
                self.retries += 1
                await asyncio.sleep(self.args.retry_sleep)
        raise ItemFailed(f"{kind}: gave up after {self.args.attempts} attempts")

    async def _read(self, response: aiohttp.ClientResponse) -> tuple[int, bytes]:
        return response.status, await response.read()

    def get(
        self, url: str, headers: dict[str, str] | None = None
    ) -> Callable[[], Awaitable[tuple[int, bytes]]]:
        async def send() -> tuple[int, bytes]:
            async with self.session.get(url, headers=headers) as response:
                return await self._read(response)

        return send

    def post_form(
        self, url: str, fields: list[tuple[str, bytes | str, str | None]]
    ) -> Callable[[], Awaitable[tuple[int, bytes]]]:
        async def send() -> tuple[int, bytes]:
            form = aiohttp.FormData()
            for name, value, filename in fields:
                if filename is None:
                    form.add_field(name, value)
                else:
                    form.add_field(name, value, filename=filename, content_type="image/jpeg")
            async with self.session.post(url, data=form, headers=self.ailab_headers) as response:
                return await self._read(response)

        return send

    def post_json(
        self, url: str, body: dict[str, Any]
    ) -> Callable[[], Awaitable[tuple[int, bytes]]]:
        async def send() -> tuple[int, bytes]:
            async with self.session.post(url, json=body, headers=self.pc_headers) as response:
                return await self._read(response)

        return send

    def put(
        self, url: str, data: bytes, headers: dict[str, str]
    ) -> Callable[[], Awaitable[tuple[int, bytes]]]:
        async def send() -> tuple[int, bytes]:
            async with self.session.put(url, data=data, headers=headers) as response:
                return await self._read(response)

        return send

    # -- one item per vendor flow ------------------------------------------------------------

    async def item(self, path: Path, out: Path) -> None:
        # Plain blocking file I/O on purpose: it is what the simplest loop does, and for
        # these files (1 KB to 3 MB, page cache) it is cheaper than a worker thread.
        data = path.read_bytes()  # noqa: ASYNC240
        if self.args.op == "ai-smile":
            result = await self.perfectcorp(path.name, data)
        else:
            result = await self.ailab(path.name, data)
        out.write_bytes(result)  # noqa: ASYNC240

    async def ailab(self, name: str, data: bytes) -> bytes:
        url = self.base + AILAB_SUBMIT[self.args.op]
        fields: list[tuple[str, bytes | str, str | None]] = [("image_target", data, name)]
        if self.args.op == "face-swap":
            fields.append(("image_template", self.template, "template.jpg"))
        else:
            fields.append(("service_choice", str(self.args.service_choice), None))
        status, body = await self.call("submit", self.post_form(url, fields))
        answer = json.loads(body)
        if status != 200 or answer.get("error_code"):
            raise ItemFailed(f"submit: HTTP {status}")
        if self.args.op == "emotion-editor":
            return base64.b64decode(answer["data"]["image"])
        poll_url = f"{self.base}{AILAB_POLL}?task_id={quote(answer['task_id'], safe='')}"
        while True:
            await asyncio.sleep(self.args.poll_interval)
            status, body = await self.call("poll", self.get(poll_url, self.ailab_headers))
            answer = json.loads(body)
            if status != 200:
                raise ItemFailed(f"poll: HTTP {status}")
            task_status = answer.get("task_status")
            if task_status == 2:
                return await self.download(answer["data"]["image"])
            if task_status not in (0, 1):
                raise ItemFailed(f"task ended with status {task_status}")

    async def perfectcorp(self, name: str, data: bytes) -> bytes:
        spec = {"content_type": "image/jpeg", "file_name": name, "file_size": len(data)}
        status, body = await self.call(
            "upload", self.post_json(self.base + PC_FILE, {"files": [spec]})
        )
        if status != 200:
            raise ItemFailed(f"file record: HTTP {status}")
        record = json.loads(body)["data"]["files"][0]
        target = record["requests"][0]
        status, _ = await self.call("put", self.put(target["url"], data, target["headers"]))
        if status != 200:
            raise ItemFailed(f"PUT: HTTP {status}")
        task_body = {"src_file_id": record["file_id"], "expression_type": self.args.expression_type}
        status, body = await self.call("submit", self.post_json(self.base + PC_TASK, task_body))
        if status != 200:
            raise ItemFailed(f"create task: HTTP {status}")
        task_id = json.loads(body)["data"]["task_id"]
        poll_url = f"{self.base}{PC_TASK}/{quote(task_id, safe='')}"
        while True:
            await asyncio.sleep(self.args.poll_interval)
            status, body = await self.call("poll", self.get(poll_url, self.pc_headers))
            if status != 200:
                raise ItemFailed(f"poll: HTTP {status}")
            answer = json.loads(body)["data"]
            if answer["task_status"] == "success":
                return await self.download(answer["results"]["url"])
            if answer["task_status"] != "running":
                raise ItemFailed(f"task ended: {answer.get('error')}")

    async def download(self, url: str) -> bytes:
        status, body = await self.call("download", self.get(url))
        if status != 200:
            raise ItemFailed(f"download: HTTP {status}")
        return body


async def run(args: argparse.Namespace) -> dict[str, Any]:
    names = sorted(e.name for e in os.scandir(args.inputs) if e.name.endswith(".jpg"))
    args.out.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=max(100, 2 * args.concurrency))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = Loop(args, session)
        slots = asyncio.Semaphore(args.concurrency)
        running: set[asyncio.Task[None]] = set()

        async def one(name: str) -> None:
            try:
                await loop.item(args.inputs / name, args.out / name)
                counts["succeeded"] += 1
            except ItemFailed as exc:
                counts["failed"] += 1
                loop.errors[str(exc)] += 1
            finally:
                slots.release()

        for name in names:
            if args.skip_existing and (args.out / name).exists():
                counts["skipped"] += 1
                continue
            await slots.acquire()  # a task is created only when a slot is free
            task = asyncio.create_task(one(name))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)
    return {
        "items": len(names),
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "skipped": counts["skipped"],
        "requests": dict(loop.requests),
        "statuses": {str(k): v for k, v in sorted(loop.statuses.items())},
        "retries": loop.retries,
        "errors": dict(loop.errors.most_common(5)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--op", required=True, choices=["face-swap", "emotion-editor", "ai-smile"])
    ap.add_argument("--inputs", type=Path, required=True, help="folder of *.jpg inputs")
    ap.add_argument("--out", type=Path, required=True, help="folder for the results")
    ap.add_argument("--template", type=Path, help="face swap template image")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--poll-interval", type=float, default=0.1)
    ap.add_argument("--service-choice", type=int, default=12, help="emotion editor code")
    ap.add_argument("--expression-type", default="closed_mouth_smile", help="AI Smile type")
    ap.add_argument("--retry-sleep", type=float, default=1.0)
    ap.add_argument("--attempts", type=int, default=30)
    ap.add_argument("--skip-existing", action="store_true")
    ap.add_argument("--summary", type=Path, help="write the counts here as JSON")
    args = ap.parse_args()
    if args.op == "face-swap" and args.template is None:
        ap.error("--op face-swap needs --template")
    summary = asyncio.run(run(args))
    text = json.dumps(summary, sort_keys=True)
    if args.summary:
        args.summary.write_text(text + "\n")
    else:
        print(text)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

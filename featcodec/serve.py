"""`featcodec serve`: the server side of split computing as an HTTP service (Starlette on uvicorn).

``POST /v1/decode`` takes a featcodec stream and answers what ``featcodec decode
--json`` prints (``?top=K``), or with ``?features=1`` the rebuilt split tensors
as safetensors. ``GET /v1/models`` answers ``featcodec models --json``, ``GET
/healthz`` says the server is up.

Dynamic batching: the records of the requests that arrive within ``max_wait``
of the first one waiting (up to ``max_batch`` records) are decoded together
by :func:`featcodec.batch_decode.decode_requests`, in a pool of decoding
threads (one batch each), so the event loop keeps taking requests meanwhile. Bad input answers 400 (413 for
a body over ``max_body``) with ``{"error": "<the CLI's one-line message>"}``.
uvicorn stops on SIGTERM or Ctrl-C: no new connections, in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from .errors import FeatcodecError

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
except ImportError as exc:
    raise FeatcodecError(
        f"featcodec serve needs the 'serve' extra ({exc.name} is missing): pip install 'featcodec[serve]' "
        "(in a checkout: pip install -e '.[serve]')"
    ) from None

import torch

from .batch_decode import CodecCache, DecodeRequest, decode_requests, log

DEFAULT_MAX_BODY = 1 << 20
MAX_TOP = 1000  # as decode --top


class _BodyTooLarge(Exception):
    pass


class Batcher:
    """Collects requests into batches and decodes them in ``workers`` threads, one batch per thread."""

    def __init__(self, cache: CodecCache, max_batch: int, max_wait_s: float, workers: int = 1):
        self.cache = cache
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.workers = workers
        self.queue: asyncio.Queue | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.task: asyncio.Task | None = None
        self.decoding: set[asyncio.Task] = set()
        self.in_flight = 0  # requests queued or being decoded

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(
            self.workers, thread_name_prefix="featcodec-decode", initializer=torch.set_num_threads, initargs=(1,)
        )
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop collecting, let the batches in hand finish (uvicorn calls this once every request is answered)."""
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        if self.decoding:
            await asyncio.wait(self.decoding)
        if self.executor is not None:
            self.executor.shutdown(wait=True)

    async def decode(self, request: DecodeRequest):
        """(the answer to one request, the records in its batch), decoded with whatever else arrives."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((time.monotonic(), request, future))
        self.in_flight += 1
        try:
            return await future
        finally:
            self.in_flight -= 1

    async def _collect(self) -> list[tuple]:
        """The next batch: the oldest waiting request, and the others that come within ``max_wait_s`` of it."""
        first = await self.queue.get()
        batch, records = [first], len(first[1].records)
        deadline = first[0] + self.max_wait_s
        while records < self.max_batch:
            if self.queue.empty():
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
            else:
                item = self.queue.get_nowait()
            batch.append(item)
            records += len(item[1].records)
        return [item for item in batch if not item[2].done()]  # skip requests whose client left

    async def _run(self) -> None:
        """Whenever a worker is free, collect the next batch and hand it over; meanwhile requests queue."""
        free = asyncio.Semaphore(self.workers)
        while True:
            await free.acquire()
            batch = await self._collect()
            if not batch:  # every client of this batch left
                free.release()
                continue
            task = asyncio.create_task(self._decode(batch))
            self.decoding.add(task)
            task.add_done_callback(self.decoding.discard)
            task.add_done_callback(lambda _: free.release())

    async def _decode(self, batch: list[tuple]) -> None:
        try:
            answers = await asyncio.get_running_loop().run_in_executor(
                self.executor, decode_requests, self.cache, [request for _, request, _ in batch]
            )
        except Exception as exc:  # noqa: BLE001  a bug in batching: fail this batch, keep serving
            log("error in a batch: " + "".join(traceback.format_exception_only(type(exc), exc)).strip())
            answers = [exc] * len(batch)
        size = sum(len(request.records) for _, request, _ in batch)
        for (_, _, future), answer in zip(batch, answers):
            if future.done():
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result((answer, size))


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _options(query) -> tuple[int, bool]:
    """``top`` and ``features`` from the query string; FeatcodecError if malformed."""
    text = query.get("top", "5")
    if not text.isdigit() or not 1 <= int(text) <= MAX_TOP:
        raise FeatcodecError(f"top must be a whole number in 1..{MAX_TOP} (got '{text}')")
    flag = query.get("features", "0").lower()
    if flag not in ("0", "1", "false", "true"):
        raise FeatcodecError(f"features must be 0 or 1 (got '{flag}')")
    return int(text), flag in ("1", "true")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body; _BodyTooLarge as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _BodyTooLarge
    return bytes(body)


def make_app(cache: CodecCache, max_batch: int = 32, max_wait_ms: float = 5.0,
             max_body: int = DEFAULT_MAX_BODY, workers: int = 1, on_ready=None) -> Starlette:
    """The ASGI app around ``cache`` (whose codecs should be loaded already), with ``workers`` decoding threads."""
    from .cli import _model_entries
    from .codec import _with_sizes

    batcher = Batcher(cache, max_batch, max_wait_ms / 1000, workers)

    async def decode(request: Request) -> Response:
        client = f"{request.client.host}:{request.client.port}" if request.client else "?"
        try:
            top, features = _options(request.query_params)
            body = await _read_body(request, max_body)
            records = _with_sizes(body)  # refuses a bad stream before it is queued
            answer, batch_records = await batcher.decode(DecodeRequest(records, top, features))
        except _BodyTooLarge:
            log(f"413 from {client}: body over --max-body {max_body} bytes")
            return error_response(413, f"request body is over the server's limit of {max_body} bytes")
        except ClientDisconnect:
            return Response(status_code=400)
        except FeatcodecError as exc:
            log(f"400 from {client}: {_one_line(exc)}")
            return error_response(400, _one_line(exc))
        except Exception as exc:  # noqa: BLE001  the last line of defence: one line to the client
            log(f"500 from {client}:\n{traceback.format_exc().rstrip()}")
            return error_response(500, f"{type(exc).__name__}: {_one_line(exc)}")
        headers = {"featcodec-batch-records": str(batch_records)}  # how many records were decoded together
        if features:
            return Response(answer, media_type="application/octet-stream", headers=headers)
        return Response(json.dumps(answer), media_type="application/json", headers=headers)

    async def models(request: Request) -> Response:
        return Response(json.dumps(_model_entries()), media_type="application/json")

    async def healthz(request: Request) -> JSONResponse:
        loaded = [f"{spec}/{split}" for spec, split, _ in cache.codecs]
        return JSONResponse({"status": "ok", "loaded": loaded, "in_flight": batcher.in_flight})

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"{type(exc).__name__}: {_one_line(exc)}")

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await batcher.stop()

    routes = [
        Route("/v1/decode", decode, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: internal_error})


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: any free port); FeatcodecError if it cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        raise FeatcodecError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run_server(host: str = "127.0.0.1", port: int = 8000, *, weights: str | Path | None = None,
               max_batch: int = 32, max_wait_ms: float = 5.0, max_body: int = DEFAULT_MAX_BODY,
               backbone_weights: str | None = None, random_init: bool = False) -> None:
    """Load the models, serve until SIGTERM or Ctrl-C, then finish the requests in flight and return.

    Batches are decoded by as many threads as torch would use for one (``torch.get_num_threads()``:
    the cores, or ``OMP_NUM_THREADS``), each running torch on one thread: on the 2-core CPU two
    batches at a time decoded faster than one batch on two threads (docs/serve.md).
    """
    workers = torch.get_num_threads()
    sock = _listen(host, port)
    cache = CodecCache(weights, backbone_weights, random_init)
    loaded = cache.preload()
    if not loaded:
        log("no shipped ladder found: models load on first use")
    bound = sock.getsockname()
    url = f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}"
    ready = f"listening on {url} (max batch {max_batch}, max wait {max_wait_ms:g} ms, {workers} decoding thread(s))"
    app = make_app(cache, max_batch, max_wait_ms, max_body, workers, on_ready=lambda: log(ready))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal that stopped it once it is done; a graceful stop exits 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: None)
    server.run(sockets=[sock])
    log("stopped")

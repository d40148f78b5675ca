"""The HTTP API of ``modcl serve`` (FastAPI): predictions, task changes, health, readiness and Prometheus metrics.

FastAPI + uvicorn were chosen over LitServe because the server needs its own batcher anyway (batching across tasks
with per-request version pinning and hot task changes is not what a generic per-model batcher does), and FastAPI gives
the OpenAPI schema, multipart parsing and typed errors with nothing else on top.
"""

import asyncio
import json
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ModCLError
from ..version import __version__
from .page import PAGE
from .worker import NotReadyError, Result, TaskVersion
from .config import (
    AuthError, ImageError, PayloadTooLargeError, ServeConfig, ServeError, UnsupportedMediaError, is_loopback,
)
from .server import Metrics, ModelServer
from .parsing import (
    BodyLimit, _ADD_BODY, _PREDICT_BODY, _check_key, _error_response, _images_from_request, _status, _top, decode_image,
)
from .sources import _fetch_adapter, download_hub_adapters

__all__ = ['ServeConfig', 'ServeError', 'ImageError', 'PayloadTooLargeError', 'UnsupportedMediaError',
           'AuthError', 'create_app']

log = logging.getLogger('timm_modcl.serve')


def create_app(model, config: Optional[ServeConfig] = None, initial: Optional[Dict[str, Any]] = None) -> FastAPI:
    """The FastAPI app serving ``model``'s tasks.

    Args:
        model: A modcl model; from now on only the server's inference worker calls it. Its own tasks are not
            served: tasks come from ``initial`` and the write endpoints.
        config: Limits and options.
        initial: ``{task name: adapter file or bytes}`` loaded before the app is ready.

    Raises:
        AdapterFormatError, FingerprintMismatchError, AdapterError, InvalidTaskNameError: an initial adapter
        cannot be loaded (as ``model.load_task``).
    """
    config = config or ServeConfig()
    server = ModelServer(model, config)
    if initial:
        try:
            server.worker.load(initial)
        except BaseException:
            server.worker.close()
            raise
    server.ready = True

    async def lifespan(app):
        yield
        server.ready = False
        await run_in_threadpool(server.worker.close)

    app = FastAPI(title='timm_modcl serve', version=__version__, lifespan=lifespan,
                  description='One frozen timm backbone serving many task adapters (Adaptive Weight Modulation): '
                              'predictions batched across tasks, tasks added, replaced and removed while serving.')
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.middleware('http')
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get('route')
        endpoint = getattr(route, 'path', None) or 'unmatched'
        dt = time.perf_counter() - t0
        server.metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
        server.metrics.latency.labels(endpoint).observe(dt)
        if endpoint not in ('/metrics', '/healthz', '/readyz'):
            log.info('request', extra=dict(event='request', method=request.method, path=request.url.path,
                                           status=response.status_code, ms=round(dt * 1000, 2)))
        return response

    @app.exception_handler(ModCLError)
    async def modcl_error(request: Request, e: ModCLError):
        status, code = _status(e)
        headers = {'Retry-After': str(config.retry_after_s)} if status in (429, 503) else None
        if status == 401:
            headers = {'WWW-Authenticate': 'Bearer'}
        if status == 429:
            server.metrics.rejected.inc()
        return _error_response(status, code, str(e), headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {400: 'bad_request', 404: 'not_found', 405: 'method_not_allowed'}.get(e.status_code, 'http_error')
        return _error_response(e.status_code, code, str(e.detail), getattr(e, 'headers', None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        msg = '; '.join(f'{".".join(map(str, err.get("loc", ())))}: {err.get("msg")}' for err in e.errors()[:5])
        return _error_response(422, 'invalid_request', msg)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception('internal error')
        return _error_response(500, 'internal_error', f'{type(e).__name__}: {e}')

    async def _await(futures) -> List[Result]:
        try:
            return await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)),
                                          config.request_timeout_s)
        except asyncio.TimeoutError:
            raise NotReadyError(f'no answer within {config.request_timeout_s} s') from None

    def _prepare_task(task: str, blobs: List[bytes]) -> Tuple[TaskVersion, List[torch.Tensor]]:
        v = server.worker.acquire(task, len(blobs))
        try:
            t = server.transform(v.input_size)
            xs = [t(decode_image(b, config.max_pixels, f'image #{i}')) for i, b in enumerate(blobs)]
        except BaseException:
            server.worker.release([v], len(blobs))
            raise
        return v, xs

    def _check_topk(topk: int) -> None:
        if topk < 1 or topk > 1000:
            raise ServeError(f'topk must be between 1 and 1000, got {topk}')

    @app.get('/', response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get('/healthz', summary='Liveness: the process answers')
    async def healthz() -> Dict[str, Any]:
        return {'status': 'ok'}

    @app.get('/readyz', summary='Readiness: tasks loaded and the inference worker running')
    async def readyz():
        if not (server.ready and server.worker.alive):
            return _error_response(503, 'not_ready', 'the server is starting or shutting down',
                                   {'Retry-After': str(config.retry_after_s)})
        return {'status': 'ready', 'tasks': len(server.worker.tasks()), 'queue': server.worker.queue_length()}

    @app.get('/metrics', summary='Prometheus metrics', response_class=Response)
    async def metrics() -> Response:
        server.metrics.queue_length.set(server.worker.queue_length())
        server.metrics.cache_bytes.set(server.cache_bytes())
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get('/v1/tasks', summary='The tasks served, with their current version and classes')
    async def list_tasks() -> Dict[str, Any]:
        return {'model': server.model_name, 'backbone_fingerprint': server.fingerprint,
                'tasks': [v.describe() for v in server.worker.tasks()]}

    @app.post('/v1/tasks/{task}/predict', summary='Top classes of images under one task',
              openapi_extra=_PREDICT_BODY)
    async def predict_task(task: str, request: Request, topk: int = 5, logits: bool = False) -> Dict[str, Any]:
        _check_topk(topk)
        server.worker.acquire(task, 0)  # an unknown task is a 404 before the body is read
        blobs = await _images_from_request(server, request)
        v, xs = await run_in_threadpool(_prepare_task, task, blobs)
        results = await _await(server.worker.submit(xs, version=v))
        server.metrics.images.labels(v.name).inc(len(xs))
        return {'task': v.name, 'version': v.version, 'predictions': [_top(r, topk, logits) for r in results]}

    @app.post('/v1/predict', summary='Task-agnostic prediction: the task of each image is chosen, then its classes',
              openapi_extra=_PREDICT_BODY)
    async def predict_any(request: Request, topk: int = 5, logits: bool = False, scorer: str = 'auto',
                          tasks: Optional[str] = None) -> Dict[str, Any]:
        _check_topk(topk)
        if scorer not in ('auto', 'prototype', 'energy', 'max_softmax'):
            raise ServeError(f'unknown scorer {scorer!r}; choose auto, prototype, energy or max_softmax')
        names = None if tasks is None else [t for t in tasks.split(',') if t]
        blobs = await _images_from_request(server, request)

        def prepare():
            vs = server.worker.acquire_all(names, len(blobs))
            try:
                s = scorer
                if s == 'auto':
                    s = 'prototype' if all(v.prototypes for v in vs) else 'energy'
                sizes = {v.input_size for v in vs}
                images = [decode_image(b, config.max_pixels, f'image #{i}') for i, b in enumerate(blobs)]
                xs = [{size: server.transform(size)(im) for size in sizes} for im in images]
            except BaseException:
                server.worker.release(vs, len(blobs))
                raise
            return vs, s, xs

        vs, s, xs = await run_in_threadpool(prepare)
        results = await _await(server.worker.submit(xs, candidates=vs, scorer=s))
        for r in results:
            server.metrics.images.labels(r.version.name).inc()
        return {'scorer': s, 'candidates': [v.name for v in vs],
                'predictions': [_top(r, topk, logits) for r in results]}

    @app.put('/v1/tasks/{task}', summary='Add or replace a task (needs the API key when one is set)',
             openapi_extra=_ADD_BODY)
    async def put_task(task: str, request: Request):
        _check_key(server, request)
        ctype = request.headers.get('content-type', '').split(';')[0].strip().lower()
        existed = any(v.name == task for v in server.worker.tasks())
        if ctype == 'multipart/form-data':
            form = await request.form(max_files=1, max_fields=4)
            try:
                item = form.get('file')
                if item is None or isinstance(item, str):
                    raise ServeError('send the adapter file as a multipart form field named "file"')
                data = await item.read()
            finally:
                await form.close()
            source: Any = data
        elif ctype == 'application/json':
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as e:
                raise ServeError(f'the body is not valid JSON ({e})') from None
            if not isinstance(body, dict):
                raise ServeError('the JSON body must be an object')
            source = await run_in_threadpool(_fetch_adapter, server, task, body)
        else:
            raise UnsupportedMediaError(f'content type {ctype or "(none)"!r} is not accepted: send the adapter as '
                                        f'multipart/form-data "file", or JSON {{"source": "folder" | "hub", ...}}')
        [v] = await run_in_threadpool(server.worker.load, {task: source})
        return JSONResponse({'task': v.name, 'version': v.version, 'replaced': existed, **v.describe()},
                            status_code=200 if existed else 201)

    @app.delete('/v1/tasks/{task}', summary='Remove a task (needs the API key when one is set)')
    async def delete_task(task: str, request: Request) -> Dict[str, Any]:
        _check_key(server, request)
        v = await run_in_threadpool(server.worker.remove, task)
        return {'task': v.name, 'version': v.version, 'removed': True}

    return app

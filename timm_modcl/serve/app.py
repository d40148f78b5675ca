"""The HTTP API of ``modcl serve`` (FastAPI): predictions, task changes, health, readiness and Prometheus metrics.

FastAPI + uvicorn were chosen over LitServe because the server needs its own batcher anyway (batching across tasks
with per-request version pinning and hot task changes is not what a generic per-model batcher does), and FastAPI gives
the OpenAPI schema, multipart parsing and typed errors with nothing else on top.
"""
import asyncio
import base64
import binascii
import hmac
import io
import ipaddress
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (AdapterError, AdapterFormatError, FingerprintMismatchError, HubError, InvalidTaskNameError,
                      ModCLError, TaskError, TaskNotFoundError)
from ..adapter import model_architecture
from ..version import __version__
from .page import PAGE
from .worker import InferenceWorker, NotReadyError, QueueFullError, Result, TaskVersion

__all__ = ['ServeConfig', 'ServeError', 'ImageError', 'PayloadTooLargeError', 'UnsupportedMediaError',
           'AuthError', 'create_app']

log = logging.getLogger('timm_modcl.serve')


class ServeError(ModCLError):
    """A request the server cannot take (base of the HTTP-level errors)."""
    status = 400


class ImageError(ServeError, ValueError):
    """A body or form field that should be an image is not one PIL can decode (HTTP 400)."""
    status = 400


class PayloadTooLargeError(ServeError, ValueError):
    """A body, an image file or an image's pixel count is over the server's limit (HTTP 413)."""
    status = 413


class UnsupportedMediaError(ServeError, ValueError):
    """The request's content type is not one the endpoint takes (HTTP 415)."""
    status = 415


class AuthError(ServeError, PermissionError):
    """A write endpoint was called without the server's API key (HTTP 401)."""
    status = 401


@dataclass
class ServeConfig:
    """Limits and options of the server (``modcl serve`` sets them from its arguments)."""
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_body_bytes: int = 32 * 2 ** 20
    max_image_bytes: int = 16 * 2 ** 20
    max_pixels: int = 40_000_000
    max_images: int = 64
    topk: int = 5
    input_size: Optional[int] = None
    api_key: Optional[str] = None
    retry_after_s: int = 1
    adapters_dir: Optional[str] = None
    hub_endpoint: Optional[str] = None
    hub_token: Optional[str] = None
    hub_cache_dir: Optional[str] = None
    hub_timeout: Optional[float] = None
    device: Optional[str] = None
    request_timeout_s: float = 120.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------- metrics
class Metrics:
    """The server's Prometheus metrics, in a registry of their own (several apps can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter('modcl_requests', 'HTTP requests', ['endpoint', 'method', 'status'], registry=r)
        self.latency = Histogram('modcl_request_latency_seconds', 'HTTP request latency', ['endpoint'], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram('modcl_batch_size', 'Images per model batch', registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_length = Gauge('modcl_queue_length', 'Images waiting for the model', registry=r)
        self.images = Counter('modcl_images', 'Images predicted, per task', ['task'], registry=r)
        self.cache_hits = Counter('modcl_cache_hits', 'Batches whose task weights were cached', ['task'], registry=r)
        self.cache_misses = Counter('modcl_cache_misses', 'Batches whose task weights were computed', ['task'],
                                    registry=r)
        self.cache_evictions = Counter('modcl_cache_evictions', 'Task weights evicted from the cache', ['task'],
                                       registry=r)
        self.cache_bytes = Gauge('modcl_cache_bytes', 'Bytes of cached effective weights', registry=r)
        self.num_tasks = Gauge('modcl_tasks', 'Tasks served', registry=r)
        self.rejected = Counter('modcl_rejected', 'Requests refused because the queue was full', registry=r)

    # the worker's interface
    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def queue(self, length: int) -> None:
        self.queue_length.set(length)

    def cache(self, task: str, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).labels(task).inc()

    def evicted(self, task: str) -> None:
        self.cache_evictions.labels(task).inc()

    def tasks(self, n: int) -> None:
        self.num_tasks.set(n)


# ------------------------------------------------------------------------------------------------- requests
class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` (declared or streamed) ends in a 413 JSON error, unread."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        msg = f'the request body is over the limit of {self.max_bytes} bytes'
        for k, v in scope.get('headers', ()):
            if k == b'content-length':
                try:
                    too_big = int(v) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await _error_response(413, 'payload_too_large', msg)(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message['type'] == 'http.request':
                seen += len(message.get('body', b''))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            if message['type'] == 'http.response.start':
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge:
            if not started:
                await _error_response(413, 'payload_too_large', msg)(scope, receive, send)


def _error_response(status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({'error': {'code': code, 'message': message, 'status': status}}, status_code=status,
                        headers=headers)


def _status(e: BaseException) -> Tuple[int, str]:
    if isinstance(e, ServeError):
        return e.status, {400: 'invalid_image', 401: 'unauthorized', 413: 'payload_too_large',
                          415: 'unsupported_media_type'}.get(e.status, 'bad_request')
    if isinstance(e, TaskNotFoundError):
        return 404, 'task_not_found'
    if isinstance(e, QueueFullError):
        return 429, 'queue_full'
    if isinstance(e, NotReadyError):
        return 503, 'not_ready'
    if isinstance(e, FingerprintMismatchError):
        return 409, 'fingerprint_mismatch'
    if isinstance(e, (AdapterFormatError, InvalidTaskNameError)):
        return 422, 'invalid_adapter' if isinstance(e, AdapterFormatError) else 'invalid_task_name'
    if isinstance(e, HubError):
        return 502, 'hub_error'
    if isinstance(e, (AdapterError, TaskError)):
        return 400, 'bad_request'
    return 500, 'internal_error'


def decode_image(data: bytes, max_pixels: int, label: str = 'image'):
    """An RGB PIL image from encoded bytes.

    Raises:
        ImageError: not an image PIL can decode. PayloadTooLargeError: more than ``max_pixels`` pixels.
    """
    from PIL import Image, UnidentifiedImageError
    if not data:
        raise ImageError(f'{label} is empty')
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise PayloadTooLargeError(f'{label} is {w}x{h} pixels, over the limit of {max_pixels} pixels')
            return im.convert('RGB')
    except Image.DecompressionBombError as e:
        raise PayloadTooLargeError(f'{label}: {e}') from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, ServeError):
            raise
        raise ImageError(f'{label} is not an image that can be decoded ({type(e).__name__}: '
                         f'{" ".join(str(e).split())[:200]})') from None


# ------------------------------------------------------------------------------------------------- the app
class ModelServer:
    """The state behind the app: the worker, preprocessing transforms, limits and metrics."""

    def __init__(self, model, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        if config.device is not None:
            model.to(config.device)
        self.model_name = model_architecture(model)[0]
        self.fingerprint = model.backbone_fingerprint()
        self._cfg_model = model  # read only for its data config (pretrained_cfg) here; only the worker calls it
        self._transforms: Dict[Optional[int], Any] = {}
        self._tlock = threading.Lock()
        self.worker = InferenceWorker(model, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000,
                                      max_queue=config.max_queue, device=config.device, metrics=self.metrics)
        self.ready = False

    def transform(self, size: Optional[int]):
        size = size or self.config.input_size
        with self._tlock:
            t = self._transforms.get(size)
            if t is None:
                from ..data import eval_transform
                t = self._transforms[size] = eval_transform(self._cfg_model, size)
            return t

    def cache_bytes(self) -> int:
        return int(self.worker.model.weight_cache.bytes)


def _check_key(server: ModelServer, request: Request) -> None:
    key = server.config.api_key
    if not key:
        return
    given = request.headers.get('x-api-key')
    auth = request.headers.get('authorization', '')
    if given is None and auth.lower().startswith('bearer '):
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        raise AuthError('this endpoint needs the server\'s API key (header "Authorization: Bearer KEY" or '
                        '"X-API-Key: KEY")')


async def _images_from_request(server: ModelServer, request: Request) -> List[bytes]:
    """The encoded images of a predict request: multipart ``file`` fields or JSON ``{"images": [base64, ...]}``."""
    cfg = server.config
    ctype = request.headers.get('content-type', '').split(';')[0].strip().lower()
    if ctype == 'multipart/form-data':
        form = await request.form(max_files=cfg.max_images, max_fields=cfg.max_images + 8)
        try:
            items = form.getlist('file')
            if not items:
                raise ImageError('no image: send the images as multipart form fields named "file"')
            out = []
            for i, item in enumerate(items):
                if isinstance(item, str):
                    raise ImageError(f'form field "file" #{i} is text, not an uploaded image file')
                data = await item.read(cfg.max_image_bytes + 1)
                if len(data) > cfg.max_image_bytes:
                    raise PayloadTooLargeError(f'image {item.filename or i!r} is over the limit of '
                                               f'{cfg.max_image_bytes} bytes')
                out.append(data)
            return out
        finally:
            await form.close()
    if ctype == 'application/json':
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f'the body is not valid JSON ({e})') from None
        images = body.get('images') if isinstance(body, dict) else None
        if not isinstance(images, list) or not images or not all(isinstance(s, str) for s in images):
            raise ImageError('a JSON body must be {"images": ["<base64>", ...]} with at least one image')
        if len(images) > cfg.max_images:
            raise PayloadTooLargeError(f'{len(images)} images in one request, the limit is {cfg.max_images}')
        out = []
        for i, s in enumerate(images):
            if s.startswith('data:') and ',' in s:
                s = s.split(',', 1)[1]
            try:
                data = base64.b64decode(s, validate=True)
            except (binascii.Error, ValueError):
                raise ImageError(f'images[{i}] is not valid base64') from None
            if len(data) > cfg.max_image_bytes:
                raise PayloadTooLargeError(f'images[{i}] is over the limit of {cfg.max_image_bytes} bytes')
            out.append(data)
        return out
    raise UnsupportedMediaError(f'content type {ctype or "(none)"!r} is not accepted: send multipart/form-data '
                                f'with "file" fields, or application/json {{"images": [base64, ...]}}')


def _top(result: Result, k: int, with_logits: bool) -> Dict[str, Any]:
    v = result.version
    z = result.logits
    out: Dict[str, Any] = {'task': v.name, 'version': v.version}
    if result.task_prob is not None:
        out['task_prob'] = result.task_prob
    if z.ndim == 1 and v.num_classes > 0:
        p = z.softmax(0)
        pk, ik = p.topk(min(k, p.numel()))
        names = v.class_names
        out['top'] = [{'class': int(c), 'name': None if names is None or c >= len(names) else names[c],
                       'prob': float(q)} for c, q in zip(ik.tolist(), pk.tolist())]
    if with_logits:
        out['logits'] = z.tolist()
    return out


_PREDICT_BODY = {
    'requestBody': {
        'required': True,
        'content': {
            'multipart/form-data': {'schema': {
                'type': 'object', 'required': ['file'],
                'properties': {'file': {'type': 'array', 'items': {'type': 'string', 'format': 'binary'}}}}},
            'application/json': {'schema': {
                'type': 'object', 'required': ['images'],
                'properties': {'images': {'type': 'array', 'items': {'type': 'string', 'format': 'byte'}}}}},
        },
    },
}
_ADD_BODY = {
    'requestBody': {
        'required': True,
        'content': {
            'multipart/form-data': {'schema': {
                'type': 'object', 'required': ['file'],
                'properties': {'file': {'type': 'string', 'format': 'binary',
                                        'description': 'an adapter file written by save_task / save_tasks'}}}},
            'application/json': {'schema': {
                'type': 'object',
                'properties': {
                    'source': {'type': 'string', 'enum': ['folder', 'hub'],
                               'description': '"folder": the task in the server\'s adapter folder (--out); '
                                              '"hub": the task in a Hub repo'},
                    'repo_id': {'type': 'string'}, 'revision': {'type': 'string'},
                    'subfolder': {'type': 'string'},
                    'name': {'type': 'string', 'description': 'the task\'s name in the source (default: the same)'},
                }}},
        },
    },
}


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


def _fetch_adapter(server: ModelServer, task: str, body: Dict[str, Any]) -> Any:
    """The adapter file a JSON add request points at: the server's folder or a Hub repo (downloaded first)."""
    from ..adapter import ADAPTER_FILE, read_index
    cfg = server.config
    source = body.get('source', 'hub' if 'repo_id' in body else 'folder')
    name = body.get('name', task)
    if not isinstance(name, str):
        raise ServeError('"name" must be a task name')
    if source == 'folder':
        if not cfg.adapters_dir:
            raise ServeError('the server was started without an adapter folder (--out); upload the adapter file '
                             'or name a Hub repo')
        index = read_index(cfg.adapters_dir)
        if name not in index['tasks']:
            raise TaskNotFoundError(f'the adapter folder has no task {name!r}; it has: '
                                    f'{", ".join(index["tasks"]) or "none"}')
        return Path(cfg.adapters_dir) / name / ADAPTER_FILE
    if source == 'hub':
        repo_id, revision, subfolder = body.get('repo_id'), body.get('revision'), body.get('subfolder')
        if not isinstance(repo_id, str) or not all(isinstance(s, (str, type(None))) for s in (revision, subfolder)):
            raise ServeError('"repo_id" (and optional "revision", "subfolder") must be strings')
        return download_hub_adapters(repo_id, [name], revision=revision, subfolder=subfolder,
                                     endpoint=cfg.hub_endpoint, token=cfg.hub_token, cache_dir=cfg.hub_cache_dir,
                                     timeout=cfg.hub_timeout)[1][name]
    raise ServeError(f'unknown source {source!r}; use "folder" or "hub"')


def download_hub_adapters(repo_id: str, names: Optional[Sequence[str]] = None, *, revision: Optional[str] = None,
                          subfolder: Optional[str] = None, endpoint: Optional[str] = None,
                          token: Optional[str] = None, cache_dir: Optional[str] = None,
                          timeout: Optional[float] = None) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Download (into the huggingface_hub cache) the index and adapter files of a Hub repo.

    Returns:
        ``(index, {task: local path})``: the repo's ``modcl_index.json`` (architecture, fingerprint, tasks).

    Raises:
        HubError: repo, revision, index or task not found, or the Hub did not answer.
        AdapterFormatError: the index is malformed.
    """
    from huggingface_hub import hf_hub_download
    from ..adapter import ADAPTER_FILE, INDEX_FILE, read_index_file

    def join(p: str) -> str:
        return f'{subfolder.strip("/")}/{p}' if subfolder else p

    kw = dict(revision=revision, endpoint=endpoint, token=token, cache_dir=cache_dir,
              etag_timeout=timeout or 30)
    try:
        index = read_index_file(hf_hub_download(repo_id, join(INDEX_FILE), **kw), f'{repo_id}/{INDEX_FILE}')
        wanted = list(index['tasks']) if names is None else list(names)
        missing = [n for n in wanted if n not in index['tasks']]
        if missing:
            raise HubError(f'{repo_id!r} has no task(s) {missing}; it has {index["tasks"]}')
        return index, {n: hf_hub_download(repo_id, join(f'{n}/{ADAPTER_FILE}'), **kw) for n in wanted}
    except ModCLError:
        raise
    except Exception as e:  # noqa: BLE001 - huggingface_hub's and the transport's errors
        first = str(e).splitlines()[0] if str(e) else ''
        raise HubError(f'could not download from {repo_id!r} (revision {revision or "main"}): '
                       f'{type(e).__name__}: {first}') from None

"""Parsing and checking requests of the HTTP app: the body size limit, the API key, the images of a predict request
(multipart or base64 JSON, decoded within the pixel limit), error responses with their status, the top-k answer and
the OpenAPI request bodies.
"""

import base64
import binascii
import hmac
import io
import json
from typing import Any, Dict, List, Optional, Tuple

from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import (
    AdapterError, AdapterFormatError, FingerprintMismatchError, HubError, InvalidTaskNameError, TaskError,
    TaskNotFoundError,
)
from .worker import NotReadyError, QueueFullError, Result
from .config import AuthError, ImageError, PayloadTooLargeError, ServeError, UnsupportedMediaError
from .server import ModelServer


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

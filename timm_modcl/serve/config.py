"""The settings of ``modcl serve`` (``ServeConfig``), its typed request errors, and ``is_loopback``."""

import ipaddress
from dataclasses import dataclass
from typing import Optional

from ..errors import ModCLError


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

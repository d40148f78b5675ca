"""The state behind the HTTP app (``ModelServer``: the worker, preprocessing transforms, limits) and its Prometheus
metrics.
"""

import threading
from typing import Any, Dict, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..adapter import model_architecture
from .worker import InferenceWorker
from .config import ServeConfig


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

"""Reading one adapter file: format checks (``read_adapter``), version-1 configs, validation into a ``TaskPayload``
(``adapter_payload``, ``read_payload``), ``load_task`` and ``describe_adapter``.
"""

import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .._io import load_json
from ..config import TaskConfig
from ..errors import AdapterError, AdapterFormatError, FingerprintMismatchError, PayloadError, TaskError
from ..layers import modulator_shape
from ..payload import LayerTable, TaskPayload, read_safetensors
from ..task import BASE_TASK, TaskInfo, validate_task_name
from ..version import __version__
from .files import (
    ADAPTER_FORMAT, _FRESH_HEAD_FACTOR, _MAX_HEADER, _PathLike, _READABLE_VERSIONS, _V1_RESOLUTIONS, model_architecture,
    read_file,
)


def read_adapter(source: Union[_PathLike, bytes], name: str = 'adapter', inside: Optional[_PathLike] = None,
                 ) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """Read an adapter file (path or bytes) into ``(metadata, tensors)``, checking the format but not the model fit.

    Raises:
        AdapterFormatError: if it is not a readable timm_modcl adapter (corrupt, truncated, pickle, other
            safetensors file, unknown format version).
        AdapterError: if the file cannot be read (missing, a folder, a link inside an adapter folder, a device).
    """
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        name = str(source)
        if Path(source).is_dir():
            raise AdapterError(f'{name!r} is a folder; use load_tasks() for a folder of adapters')
        data = read_file(source, inside=inside, what='adapter file')
    try:
        meta, tensors = read_safetensors(data, repr(name), max_header=_MAX_HEADER)
    except PayloadError as e:
        raise AdapterFormatError(str(e)) from None
    if meta.get('format') != ADAPTER_FORMAT:
        raise AdapterFormatError(f'{name!r} is a safetensors file but not a timm_modcl task adapter')
    if meta.get('format_version') not in _READABLE_VERSIONS:
        raise AdapterFormatError(
            f'{name!r} has adapter format version {meta.get("format_version")!r}; this timm_modcl '
            f'({__version__}) reads versions {", ".join(_READABLE_VERSIONS)}')
    return meta, tensors


def _v1_config(weights: Optional[Mapping[str, Tuple[Tuple[int, ...], int]]], task_meta: Mapping[str, Any],
               tensors: Mapping[str, torch.Tensor], source: str) -> TaskConfig:
    """The config a version-1 (timm_modcl 0.1) adapter was built with, rebuilt from its resolution and, given the
    architecture's weight layers ``{layer: (weight shape, chunks)}``, the modulator shapes it holds."""
    res = task_meta.get('resolution')
    variant = task_meta.get('variant') or 'identity'
    try:
        base = TaskConfig(resolution=None if res is None else tuple(res), variant=variant)
    except (TaskError, TypeError) as e:
        raise AdapterFormatError(f'{source}: {e}') from None
    overrides = []
    for layer, (shape, _) in (weights or {}).items():
        expected = None if base.resolution is None else modulator_shape(shape, base.resolution)
        t = tensors.get(f'modulator.{layer}')
        if t is None:
            if expected is not None:
                overrides.append((layer, None))
            continue
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else None
        if got == expected:
            continue
        match = next((r for r in _V1_RESOLUTIONS if got is not None and modulator_shape(shape, r) == got), None)
        if match is None:
            raise AdapterFormatError(f'{source}: modulator.{layer} has shape {got}, which no resolution gives for '
                                     f'the layer weight {shape}')
        overrides.append((layer, match))
    return TaskConfig(resolution=base.resolution, variant=variant, layer_resolution=tuple(overrides))


def _task_json(meta: Mapping[str, str], source: str) -> Dict[str, Any]:
    """The ``task`` entry of an adapter header, as a dict."""
    task_meta = load_json(meta.get('task', ''), AdapterFormatError, f'the task metadata of {source}')
    if not isinstance(task_meta, dict):
        raise AdapterFormatError(f'{source} has corrupt task metadata')
    return task_meta


def adapter_payload(
        meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor], label: str = 'adapter', *,
        table: Optional[LayerTable] = None, name: Optional[str] = None,
) -> TaskPayload:
    """The validated ``TaskPayload`` of an adapter read by ``read_adapter``; with the architecture's ``table``, also
    checked against its layers (and a version-1 config rebuilt from them).

    Raises:
        AdapterFormatError: malformed task description or tensors, or (with ``table``) tensors that do not fit.
        InvalidTaskNameError: a bad ``name``.
    """
    task_meta = _task_json(meta, label)
    if meta.get('format_version') == '1':
        task_meta = dict(task_meta, config=_v1_config(None if table is None else table.weights, task_meta, tensors,
                                                      label).to_dict())
        task_meta.pop('variant', None)
        task_meta.pop('resolution', None)
    if name is not None:
        task_meta['name'] = validate_task_name(name)
    headless = meta.get('has_head') == 'false' and not any(k.startswith('head.') for k in tensors)
    max_fresh_head = max(_FRESH_HEAD_FACTOR * sum(t.numel() for t in tensors.values()), 1_000_000)
    try:
        if headless and table is not None:  # before anything else is looked at: the largest allocation asked for
            table.check_fresh_head(task_meta.get('name'), task_meta.get('num_classes'), max_fresh_head)
        payload = TaskPayload.from_meta(task_meta, tensors, headless=headless and bool(task_meta.get('num_classes')))
        if table is not None:
            payload.check(table, max_fresh_head=max_fresh_head)
    except PayloadError as e:
        raise AdapterFormatError(f'{label}: {e}') from None
    return payload


def _check_fit(model, meta: Mapping[str, str], source: str, allow_fingerprint_mismatch: bool) -> None:
    arch, _ = model_architecture(model)
    if meta.get('architecture') and meta['architecture'] != arch:
        raise AdapterFormatError(f'{source} was made for {meta["architecture"]}, the model is {arch}')
    theirs, ours = meta.get('backbone_fingerprint', ''), model.backbone_fingerprint()
    if theirs != ours:
        msg = (f'{source} was trained on other backbone weights (fingerprint {theirs[:12] or "missing"}..., '
               f'model {ours[:12]}...)')
        if not allow_fingerprint_mismatch:
            raise FingerprintMismatchError(msg + '; pass allow_fingerprint_mismatch=True to load it anyway')
        warnings.warn(msg + '; loading anyway because allow_fingerprint_mismatch=True', stacklevel=4)


def read_payload(
        model, source: Union[_PathLike, bytes], name: Optional[str] = None, allow_fingerprint_mismatch: bool = False,
        label: Optional[str] = None, inside: Optional[_PathLike] = None,
) -> TaskPayload:
    """Read an adapter and validate it for ``model`` (architecture, fingerprint, every tensor against the model's
    layers) without adding it: the model is unchanged.

    Raises:
        AdapterFormatError, FingerprintMismatchError, AdapterError, InvalidTaskNameError: see ``load_task``.
    """
    if not isinstance(source, (str, os.PathLike, bytes, bytearray)):
        raise AdapterError(f'an adapter is a file path or the bytes of a file, got {type(source).__name__}')
    label = label or (repr(str(source)) if not isinstance(source, (bytes, bytearray)) else 'adapter')
    meta, tensors = read_adapter(source, label.strip("'"), inside=inside)
    _check_fit(model, meta, label, allow_fingerprint_mismatch)
    payload = adapter_payload(meta, tensors, label, table=model.layer_table(), name=name)
    if payload.name == BASE_TASK:
        raise AdapterFormatError(f'{label} is named {BASE_TASK!r}, which is reserved; load it under another name')
    try:
        model.check_payload(payload)
    except PayloadError as e:
        raise AdapterFormatError(f'{label}: {e}') from None
    return payload


def _add_payloads(model, payloads: Mapping[str, TaskPayload], replace: bool, activate: bool) -> List[str]:
    """``model.load_payloads`` with its errors as adapter errors, warning about tasks that get a fresh head."""
    try:
        names = model.load_payloads(list(payloads.values()), replace=replace, activate=activate)
    except PayloadError as e:
        raise AdapterFormatError(str(e)) from None
    for label, p in payloads.items():
        if p.headless:
            warnings.warn(f'{label} has no head; task {p.name!r} gets a new, untrained head', stacklevel=4)
    return names


def load_task(
        model, path: Union[_PathLike, bytes], name: Optional[str] = None, replace: bool = False,
        allow_fingerprint_mismatch: bool = False, activate: bool = False,
) -> TaskInfo:
    """Add the task stored in an adapter file to ``model``.

    Everything is read and validated before the model is touched: on any error the model (and the global random
    state) is unchanged.

    Args:
        model: A modcl model with the same architecture (and backbone weights) the adapter was trained on.
        path: The adapter file (or its bytes).
        name: Load under this name instead of the stored one.
        replace: Replace an existing task of that name instead of raising.
        allow_fingerprint_mismatch: Load even if the adapter was trained on other backbone weights (warns).
        activate: Make the loaded task the active one.

    Returns:
        The loaded task's ``TaskInfo``.

    Raises:
        AdapterFormatError: corrupt or truncated file, not an adapter, pickle file, unknown format version,
            missing / extra tensors (every tensor the task's config needs must be there), wrong shapes or dtypes,
            NaN/Inf or out-of-range values, other architecture.
        FingerprintMismatchError: trained on other backbone weights (unless allowed).
        TaskExistsError: a task of that name exists (unless ``replace``).
        InvalidTaskNameError: bad ``name``.
        AdapterError: the file cannot be read (missing, a folder, a device or FIFO), or ``path`` is neither a path
            nor bytes.
    """
    payload = read_payload(model, path, name=name, allow_fingerprint_mismatch=allow_fingerprint_mismatch)
    label = repr(str(path)) if not isinstance(path, (bytes, bytearray)) else 'adapter'
    (n,) = _add_payloads(model, {label: payload}, replace=replace, activate=activate)
    return model.task_info(n)


def describe_adapter(source: Union[_PathLike, bytes], inside: Optional[_PathLike] = None) -> Dict[str, Any]:
    """A validated summary of an adapter file without a model: format, architecture, fingerprint, dtype, task name,
    classes, config and sizes (what ``modcl info`` prints).

    Raises:
        AdapterFormatError, AdapterError: as ``read_adapter``, or when the task metadata or a tensor is malformed.
    """
    label = 'adapter' if isinstance(source, (bytes, bytearray)) else repr(str(source))
    meta, tensors = read_adapter(source, label.strip("'"), inside=inside)
    payload = adapter_payload(meta, tensors, label)
    return dict(
        payload.describe(),
        name=payload.name,
        num_classes=payload.num_classes,
        class_names=None if payload.class_names is None else list(payload.class_names),
        config=payload.config,
        format_version=int(meta['format_version']),
        architecture=meta.get('architecture', ''),
        pretrained_tag=meta.get('pretrained_tag', ''),
        backbone_fingerprint=meta.get('backbone_fingerprint', ''),
        dtype=meta.get('dtype', ''),
        has_head=meta.get('has_head') != 'false',
        has_stats=bool(payload.stats),
        timm_modcl_version=meta.get('timm_modcl_version', ''),
        metadata=dict(payload.metadata),
    )

"""Task adapters: one task (modulators, norm statistics and affine, head, metadata) as one small safetensors file.

File format (``format_version`` 2): a safetensors file whose tensors use the flat task naming of ``TaskState``
(``modulator.<layer>``, ``bn.<layer>.running_mean|running_var|num_batches_tracked``, ``norm.<layer>.weight|bias``,
``head.weight|bias``, and ``stats.<name>`` when the task has statistics such as class prototypes) and whose header
metadata holds ``format``, ``format_version``, ``timm_modcl_version``, ``architecture``, ``pretrained_tag``,
``backbone_fingerprint`` (SHA-256 of the frozen backbone tensors), ``dtype``, ``has_head``, ``has_stats`` and ``task``
(JSON: name, num_classes, class_names, config, metadata). The header is written with sorted keys, so the same task
always gives the same bytes.

Version 1 files (timm_modcl 0.1) still load: they had no config, so it is rebuilt from the recorded resolution and
variant and the modulator shapes present (a layer without modulator is unmodulated; a layer whose modulator has another
shape gets the per-layer resolution that produces it).

A folder of adapters (``save_tasks``) holds ``modcl_index.json`` and one ``<task>/adapter_model.safetensors`` plus a
human-readable ``<task>/adapter_config.json`` per task, as PEFT lays out its adapters. The index records the
architecture, the backbone fingerprint and (since 0.3) its ``layers`` (``payload.LayerTable``), so folders are
validated, merged, pushed and pulled without building a backbone (``read_folder``, ``check_adapters``).

Every adapter is read into a ``payload.TaskPayload``, the one place where a task's tensors are validated.

Reading never unpickles anything and reads only regular files (inside an adapter folder: no links); every write goes
to a temporary file that is renamed into place.
"""

from pathlib import Path
from typing import Iterable, List, Optional, Union

import torch

from .._io import atomic_write_bytes
from ..task import TaskInfo
from .files import (
    ADAPTER_CONFIG_FILE, ADAPTER_FILE, ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION, INDEX_FILE, INDEX_FORMAT,
    INDEX_FORMAT_VERSION, _PathLike, adapter_bytes, adapter_metadata, model_architecture, payload_bytes, read_file,
    save_task,
)
from .loading import adapter_payload, describe_adapter, load_task, read_adapter, read_payload
from .folders import (
    adapter_config_bytes, index_bytes, index_layer_table, load_task_files, load_tasks, parse_index, read_index,
    read_index_file, save_tasks, task_names, write_index,
)
from .merging import check_adapters, merge_adapter_folders, read_folder

__all__ = [
    'ADAPTER_FORMAT', 'ADAPTER_FORMAT_VERSION', 'ADAPTER_FILE', 'ADAPTER_CONFIG_FILE', 'INDEX_FILE',
    'save_task', 'load_task', 'save_tasks', 'load_tasks', 'read_adapter', 'read_index', 'read_index_file', 'parse_index', 'write_index',
    'adapter_metadata', 'adapter_bytes', 'describe_adapter', 'load_task_files', 'merge_adapter_folders',
    'read_file', 'AdapterMixin', 'payload_bytes', 'adapter_payload', 'read_payload', 'read_folder', 'check_adapters',
    'index_bytes', 'index_layer_table', 'adapter_config_bytes', 'model_architecture',
]


class AdapterMixin:
    """Adapter file methods of modcl models (see the module functions for the details)."""

    def save_task(self, name: str, path: _PathLike, dtype: Optional[torch.dtype] = None,
                  include_head: bool = True, include_stats: bool = True) -> Path:
        """Save one task as a safetensors adapter file; see ``timm_modcl.adapter.save_task``."""
        return save_task(self, name, path, dtype=dtype, include_head=include_head, include_stats=include_stats)

    def load_task(self, path: Union[_PathLike, bytes], name: Optional[str] = None, replace: bool = False,
                  allow_fingerprint_mismatch: bool = False, activate: bool = False) -> TaskInfo:
        """Add the task of an adapter file; see ``timm_modcl.adapter.load_task``."""
        return load_task(self, path, name=name, replace=replace,
                         allow_fingerprint_mismatch=allow_fingerprint_mismatch, activate=activate)

    def save_tasks(self, directory: _PathLike, names: Optional[Iterable[str]] = None,
                   dtype: Optional[torch.dtype] = None, include_head: bool = True) -> Path:
        """Save tasks into an adapter folder with an index; see ``timm_modcl.adapter.save_tasks``."""
        return save_tasks(self, directory, names=names, dtype=dtype, include_head=include_head)

    def load_tasks(self, directory: _PathLike, names: Optional[Iterable[str]] = None, replace: bool = False,
                   allow_fingerprint_mismatch: bool = False) -> List[str]:
        """Add the tasks of an adapter folder, all or nothing; see ``timm_modcl.adapter.load_tasks``."""
        return load_tasks(self, directory, names=names, replace=replace,
                          allow_fingerprint_mismatch=allow_fingerprint_mismatch)

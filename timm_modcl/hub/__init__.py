"""Share task adapters through the Hugging Face Hub.

A Hub repo (or a ``subfolder`` of one) holds the same layout as ``save_tasks`` writes: ``modcl_index.json`` and
``<task>/adapter_model.safetensors`` + ``<task>/adapter_config.json``, plus a model card ``README.md``. Pushing adds
tasks to what the repo already lists; pulling downloads only the index and the requested tasks' adapter files (no
code, no full checkpoint) through the huggingface_hub cache, so pinned revisions and ``HF_HUB_OFFLINE=1`` work.
``push_folder`` / ``pull_folder`` work on adapter folders without building a backbone (adapters are checked against
the index's architecture, fingerprint and layer table); ``push_tasks`` / ``pull_tasks`` build on them for a model.
Every Hub step runs within one time bound (``timeout=`` / ``MODCL_HUB_TIMEOUT``), and answers whose ETag would name
a file outside the cache are refused (see ``_check_response``).
"""

from typing import Iterable, List, Optional

from .remote import LIBRARY_NAME, download_adapter_files, remote_index
from .cards import task_model_card
from .push import push_folder, push_tasks
from .pull import pull_folder, pull_tasks

__all__ = ['push_folder', 'pull_folder', 'push_tasks', 'pull_tasks', 'remote_index', 'download_adapter_files',
           'task_model_card', 'HubMixin']


class HubMixin:
    """Hub methods of modcl models (see ``push_tasks`` / ``pull_tasks``)."""

    def push_tasks_to_hub(self, repo_id: str, names: Optional[Iterable[str]] = None, **kwargs) -> str:
        """Push tasks to a Hub repo; see ``timm_modcl.hub.push_tasks``."""
        return push_tasks(self, repo_id, names, **kwargs)

    def load_tasks_from_hub(self, repo_id: str, names: Optional[Iterable[str]] = None, **kwargs) -> List[str]:
        """Add tasks from a Hub repo; see ``timm_modcl.hub.pull_tasks``."""
        return pull_tasks(self, repo_id, names, **kwargs)

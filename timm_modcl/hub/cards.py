"""The model card of a repo of task adapters (``task_model_card``), with the Hub metadata of an adapter of a timm
backbone.
"""

from typing import Any, Dict, List, Optional

from huggingface_hub import ModelCard, ModelCardData

from ..adapter import model_architecture
from .remote import LIBRARY_NAME


def _base_model_id(model) -> Optional[str]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('hf_hub_id') or None


def task_model_card(model, names: List[str], repo_id: str, sizes: Dict[str, int]) -> ModelCard:
    """A model card for a repo of task adapters, with the Hub metadata of an adapter of a timm backbone."""
    arch, _ = model_architecture(model)
    infos = model.tasks
    rows = {n: dict(num_classes=infos[n].num_classes, class_names=infos[n].class_names, config=infos[n].config,
                    num_added_values=infos[n].num_added_params, metadata=infos[n].metadata) for n in names}
    return _card(arch, model.backbone_fingerprint(), _base_model_id(model), rows, repo_id, sizes)


def _registry_base_model(architecture: str, tag: str) -> Optional[str]:
    """The Hub id of timm's pretrained weights for ``architecture.tag``, from timm's registry (no model is built)."""
    if not tag:
        return None
    try:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(f'{architecture}.{tag}')
    except Exception:  # noqa: BLE001 - an unknown architecture or tag: no base model recorded
        return None
    return getattr(cfg, 'hf_hub_id', None) or None


def _card(arch: str, fingerprint: str, base: Optional[str], rows: Dict[str, Dict[str, Any]], repo_id: str,
          sizes: Dict[str, int]) -> ModelCard:
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base,
        pipeline_tag='image-classification',
        license='apache-2.0',
        tags=['continual-learning', 'timm', 'timm_modcl', 'image-classification', 'adapter',
              'weight-modulation'],
        base_model_relation='adapter' if base else None,
    )
    lines = []
    for n, r in rows.items():
        classes = ', '.join(r['class_names']) if r['class_names'] else f'{r["num_classes"]} classes'
        metrics = ', '.join(f'{k}={v}' for k, v in r['metadata'].items() if k.startswith('metric')) or '-'
        lines.append(f'| `{n}` | {r["num_classes"]} | {classes} | {r["config"].variant} | {r["config"].resolution} | '
                     f'{r["num_added_values"]:,} | {sizes.get(n, 0) / 1024:.1f} KiB | {metrics} |')
    first = next(iter(rows), 'TASK')
    body = f"""
# {repo_id.split('/')[-1]}: timm_modcl task adapters

Task adapters for continual learning on a frozen `{arch}` backbone with Adaptive Weight Modulation
([arXiv 2311.15276](https://arxiv.org/abs/2311.15276)). Each adapter holds one task's low-resolution weight
modulators, its BatchNorm running statistics and its classifier head; adding it to a model changes no other task.

Backbone fingerprint (SHA-256 of the frozen weights): `{fingerprint}`
{'' if base else chr(10) + 'Backbone weights: loaded from a local file (no Hub id recorded).' + chr(10)}
| task | classes | class names | variant | resolution | added values | file size | metrics |
|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

## How to use

```python
import timm, timm_modcl

model = timm.create_model("{arch}", pretrained=True)
model.load_tasks_from_hub("{repo_id}")        # or: timm.create_model(..., adapters="{repo_id}")
model.set_task("{first}")
model.eval()
```

Or from the shell: `modcl pull --repo-id {repo_id} --out adapters/`.
"""
    return ModelCard(f'---\n{data.to_yaml()}\n---\n{body}')

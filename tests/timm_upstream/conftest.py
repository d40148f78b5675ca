"""Run timm's own ``tests/test_models.py`` on the ``modcl_*`` models (the real file from timm's sdist, unchanged).

``fetch.py`` (run by ``.ci/run``) copies the file of the installed timm version here. timm's test file picks models
and their test variants by name patterns (``vit_*`` are "non-standard" transformers, ``hrnet*`` cannot be scripted,
...); a ``modcl_<name>`` model is the plain ``<name>`` made task-aware, so it must be classified as ``<name>`` is. The
only adaptation is therefore at selection time: ``timm.list_models`` also matches each pattern with the ``modcl_``
prefix while the test module is collected. The tests themselves run as timm wrote them.

Selected: every test parametrised with a ``modcl_*`` model of ``MODELS`` (the smallest member of each family; set
``MODCL_TIMM_TESTS=all`` for every ``modcl_*`` model). Deselected, and listed at the end of the run:
``test_model_load_pretrained`` / ``test_model_features_pretrained``, which download weights from the Hub (the
offline pretrained path is tested in ``tests/test_pretrained.py``); timm's tests of its own models.
"""
import fnmatch
import os

import timm
import timm.models

import timm_modcl  # noqa: F401  (registers the modcl_* models before timm's test module lists models)

#: The smallest member of each registered family (CI); MODCL_TIMM_TESTS=all selects every modcl_* model.
MODELS = (
    'modcl_mobilenetv2_050', 'modcl_efficientnet_b0', 'modcl_tf_efficientnet_b0', 'modcl_mobilenetv3_large_100',
    'modcl_resnet18', 'modcl_convnext_atto', 'modcl_vit_tiny_patch16_224',
)
NEEDS_NETWORK = ('test_model_load_pretrained', 'test_model_features_pretrained')

_list_models = timm.list_models


def _with_prefix(patterns):
    if not patterns:
        return patterns
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return patterns + ['modcl_' + p for p in patterns if not p.startswith('modcl_')]


def _prefix_aware_list_models(filter='', module='', pretrained=False, exclude_filters='', name_matches_cfg=False,
                              include_tags=None):
    return _list_models(filter=_with_prefix(filter), module=module, pretrained=pretrained,
                        exclude_filters=_with_prefix(exclude_filters), name_matches_cfg=name_matches_cfg,
                        include_tags=include_tags)


timm.list_models = _prefix_aware_list_models  # `from timm import list_models` in test_models.py picks this up


def _selected(name: str) -> bool:
    if not name.startswith('modcl_'):
        return False
    wanted = os.environ.get('MODCL_TIMM_TESTS', '')
    if wanted == 'all':
        return True
    if wanted:
        return any(fnmatch.fnmatchcase(name, p) for p in wanted.split(','))
    return name.split('.')[0] in MODELS


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        if 'timm_upstream' not in str(item.fspath):
            keep.append(item)
            continue
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        name = params.get('model_name')
        if isinstance(name, str) and _selected(name) and item.originalname not in NEEDS_NETWORK:
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep

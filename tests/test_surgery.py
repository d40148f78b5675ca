"""Module surgery on a task-aware model either works or raises FrozenBackboneError naming the supported way; the
frozen weights are never lost (issue 16, item 3)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune  # noqa: F401  (a submodule torch does not import)

import timm
import timm_modcl  # noqa: F401  (registers the modcl_* models)
from timm_modcl import FrozenBackboneError


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = timm.create_model('modcl_mobilenetv2_050', pretrained=False)
    m.add_task('t', num_classes=3)
    return m.eval()


def _frozen(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m, before, x, ref):
    now = m.state_dict()
    assert set(now) == set(before) and all(torch.equal(now[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(m(x), ref)


SURGERY = {
    'assign weight': lambda conv: setattr(conv, 'weight', nn.Parameter(torch.zeros_like(conv.weight))),
    'assign bias buffer': lambda conv: setattr(conv, 'weight', torch.zeros_like(conv.weight)),
    'delete weight': lambda conv: delattr(conv, 'weight'),
    'weight_norm': lambda conv: torch.nn.utils.parametrizations.weight_norm(conv),
    'old weight_norm': lambda conv: torch.nn.utils.weight_norm(conv),
    'spectral_norm': lambda conv: torch.nn.utils.parametrizations.spectral_norm(conv),
    'l1_unstructured': lambda conv: torch.nn.utils.prune.l1_unstructured(conv, 'weight', amount=0.5),
    'random_structured': lambda conv: torch.nn.utils.prune.random_structured(conv, 'weight', amount=0.5, dim=0),
    'new parameter': lambda conv: conv.register_parameter('extra', nn.Parameter(torch.zeros(1))),
    'delete modulator': lambda conv: delattr(conv, 'modulator'),
}


@pytest.mark.parametrize('what', sorted(SURGERY))
def test_surgery_on_a_modulated_conv_is_refused_and_keeps_the_frozen_weight(model, what):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    before = _frozen(model)
    conv = model.conv_head
    with pytest.raises(FrozenBackboneError, match='export_task'):
        SURGERY[what](conv)
    assert isinstance(conv.__dict__['_buffers']['weight'], torch.Tensor)
    _unchanged(model, before, x, ref)


def test_surgery_on_a_norm_layer_is_refused(model):
    before = _frozen(model)
    bn = model.bn1
    for op in (lambda: setattr(bn, 'weight', nn.Parameter(torch.ones_like(bn.weight))),
               lambda: delattr(bn, 'bias'),
               lambda: torch.nn.utils.parametrizations.weight_norm(bn)):
        with pytest.raises(FrozenBackboneError):
            op()
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in before.items())


def test_the_supported_way_prunes_a_plain_export(model):
    plain = model.export_task('t')
    torch.nn.utils.prune.l1_unstructured(plain.conv_head, 'weight', amount=0.5)
    assert float((plain.conv_head.weight == 0).float().mean()) >= 0.5


def test_prune_intermediate_layers_after_tasks_is_refused_and_changes_nothing(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    before = _frozen(model)
    with pytest.raises(FrozenBackboneError, match='before adding tasks'):
        model.prune_intermediate_layers(indices=2)
    _unchanged(model, before, x, ref)


def test_prune_intermediate_layers_before_tasks_keeps_tasks_consistent():
    m = timm.create_model('modcl_mobilenetv2_050', pretrained=False)
    n_layers = len(m.modulated_layers)
    m.prune_intermediate_layers(indices=2, prune_head=True)
    assert len(m.modulated_layers) < n_layers
    base = m.modcl_tasks['base']
    assert set(base.modulators) <= set(m.modulated_layers)
    assert set(base.norm_stats) <= set(m.norm_layers)
    m.add_task('t', num_classes=0)
    sd = m.state_dict()
    fresh = timm.create_model('modcl_mobilenetv2_050', pretrained=False)
    fresh.prune_intermediate_layers(indices=2, prune_head=True)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    m.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(m.forward_features(x), fresh.forward_features(x))


def test_vit_set_input_size_patch_size_after_tasks_is_refused_and_image_size_allowed():
    m = timm.create_model('modcl_vit_tiny_patch16_224', pretrained=False, img_size=32)
    m.add_task('t', num_classes=2)
    before = _frozen(m)
    with pytest.raises(FrozenBackboneError):
        m.set_input_size(patch_size=(8, 8))
    now = m.state_dict()
    assert all(torch.equal(now[k], v) for k, v in before.items())
    m.set_input_size(img_size=(48, 48))                  # the shared position embedding is resampled: allowed
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 48, 48)).shape == (1, 2)

"""timm conformance with a task active, for every registered ``modcl_*`` model.

timm's own ``tests/test_models.py`` (``tests/timm_upstream``) runs its checks on fresh models, whose active task is
``base``. These make the same calls (forward, backward, ``forward_features`` / ``forward_head``,
``reset_classifier``, ``forward_intermediates``, ``features_only``, torch.fx, TorchScript, torch.compile) with a
modulated task active, on every registered model, at small input sizes.
"""
import pytest
import torch

import timm
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import timm_modcl

MODELS = timm.list_models('modcl_*')
SIZE = 32


def _create(name, **kwargs):
    if name.startswith('modcl_vit'):
        kwargs.setdefault('img_size', SIZE)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def _with_task(name, num_classes=5, **kwargs):
    model = _create(name, **kwargs)
    model.add_task('t', num_classes, resolution=(2, 2), variant='paper', bn_affine=True)
    return model


def _x(n=2):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def test_registered_families():
    assert set(MODELS) >= {
        'modcl_mobilenetv2_050', 'modcl_mobilenetv2_075', 'modcl_mobilenetv2_100', 'modcl_mobilenetv2_140',
        'modcl_resnet18', 'modcl_resnet50', 'modcl_efficientnet_b0', 'modcl_tf_efficientnet_b0',
        'modcl_mobilenetv3_large_100', 'modcl_convnext_atto', 'modcl_convnext_tiny',
        'modcl_vit_tiny_patch16_224', 'modcl_vit_small_patch16_224'}
    # registered in modules named like timm's families, so timm's model tests select them alike
    assert set(timm.list_models('modcl_*', module='efficientnet')) >= {'modcl_mobilenetv2_100', 'modcl_efficientnet_b0'}
    assert set(timm.list_models('modcl_*', module='vision_transformer')) == {
        'modcl_vit_tiny_patch16_224', 'modcl_vit_small_patch16_224'}
    pretrained = timm.list_pretrained('modcl_*')
    for tag in ('modcl_mobilenetv2_100.ra_in1k', 'modcl_mobilenetv2_100.tv_in1k', 'modcl_resnet50.a1_in1k',
                'modcl_vit_small_patch16_224.augreg_in21k_ft_in1k', 'modcl_convnext_atto.d2_in1k'):
        assert tag in pretrained
    cfg = timm.models.get_pretrained_cfg('modcl_resnet18.a1_in1k')
    assert cfg.hf_hub_id == 'timm/resnet18.a1_in1k' and cfg.paper_ids == 'arXiv:2311.15276'


@pytest.mark.parametrize('model_name', MODELS)
def test_forward_backward_with_a_task(model_name):
    model = _with_task(model_name, 42).train()
    out = model(_x())
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in named.values()} == {id(p) for p in model.task_parameters('t')}
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)
    for n, p in named.items():
        assert p.grad is not None, f'no gradient for {n}'
    assert not any(t.grad is not None for t in model.frozen_tensors().values())


@pytest.mark.parametrize('model_name', MODELS)
def test_default_cfg_features_head_and_reset(model_name):
    model = _with_task(model_name).eval()
    x = _x(1)
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (1, model.head_hidden_size)
    cfg = model.pretrained_cfg
    sd = model.state_dict()
    assert cfg['classifier'] + '.weight' in sd and cfg['first_conv'] + '.weight' in sd
    model.reset_classifier(0)  # the active task's head
    assert model.num_classes == 0 and model.tasks['t'].num_classes == 0
    assert model(x).shape == (1, model.head_hidden_size)
    model.reset_classifier(7)
    assert model(x).shape == (1, 7) and model.tasks['t'].num_classes == 7
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.task_parameters('t')}
    model.set_task('base')
    assert model(x).shape == (1, 1000)  # the other task's head is untouched


@pytest.mark.parametrize('model_name', MODELS)
def test_forward_intermediates_with_a_task(model_name):
    model = _with_task(model_name).eval()
    x = _x(1)
    final, intermediates = model.forward_intermediates(x)
    assert len(intermediates) == len(model.feature_info)
    torch.testing.assert_close(final, model.forward_features(x))
    only = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(only, intermediates))


@pytest.mark.parametrize('model_name', MODELS)
def test_features_only_with_tasks(model_name):
    model = _create(model_name, features_only=True).eval()
    x = _x(1)
    base = model(x)
    with pytest.raises(timm_modcl.TaskError, match='num_classes=0'):
        model.add_task('t', 3)
    model.add_task('t', 0, resolution=(2, 2), variant='paper')
    out = model(x)
    assert [o.shape[1] for o in out] == model.feature_info.channels()
    assert any(not torch.equal(a, b) for a, b in zip(out, base))
    model.set_task('base')
    assert all(torch.equal(a, b) for a, b in zip(model(x), base))


def _fx(model, train):
    model.train(train)
    train_nodes, eval_nodes = get_graph_node_names(model)
    return create_feature_extractor(model, return_nodes=[(train_nodes if train else eval_nodes)[-1]])


@pytest.mark.parametrize('model_name', MODELS)
def test_fx_with_a_task(model_name):
    model = _with_task(model_name, 6)
    x = _x(2)
    with torch.no_grad():
        eager = model.eval()(x)
        fx_out = tuple(_fx(model, train=False).eval()(x).values())[0]
    torch.testing.assert_close(fx_out, eager)
    fx_model = _fx(model, train=True).train()
    out = tuple(fx_model(x).values())[0]
    out.mean().backward()
    # the traced layers read the task's tensors from the model's tasks: the gradients reach exactly those
    assert all(p.grad is not None for p in model.task_parameters('t') if p.requires_grad)
    assert not any(p.grad is not None for n in model.tasks if n != 't' for p in model.task_parameters(n))


@pytest.mark.parametrize('model_name', ['modcl_mobilenetv2_050', 'modcl_vit_tiny_patch16_224'])
def test_torch_compile_with_a_task(model_name):
    model = _with_task(model_name).eval()
    x = _x(1)
    with torch.no_grad():
        eager = model(x)
        # aot_eager: dynamo capture + AOT autograd without inductor's C++ codegen (minutes on 2 CPU cores)
        out = torch.compile(model, backend='aot_eager')(x)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)

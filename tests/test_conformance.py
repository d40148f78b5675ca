"""timm conformance: every modcl_* model passes the checks timm's own tests/test_models.py makes."""
import pytest
import torch

import timm
from timm.models._features_fx import get_graph_node_names, create_feature_extractor

MODELS = timm.list_models('modcl_*')
SIZE = 64  # small inputs keep the suite fast on CPU


def test_registered_in_own_module():
    assert set(MODELS) >= {'modcl_mobilenetv2_050', 'modcl_mobilenetv2_075', 'modcl_mobilenetv2_100',
                           'modcl_mobilenetv2_140'}
    assert set(timm.list_models(module='modcl_mobilenetv2')) == set(MODELS)
    assert 'modcl_mobilenetv2_100.tv_in1k' in timm.list_pretrained('modcl_*')
    assert 'modcl_mobilenetv2_100.ra_in1k' in timm.list_pretrained('modcl_*')


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward(model_name):
    model = timm.create_model(model_name, pretrained=False).eval()
    out = model(torch.randn(1, 3, SIZE, SIZE))
    assert out.shape == (1, 1000)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize('model_name', MODELS)
def test_model_grad_checkpointing_same_output(model_name):
    model = timm.create_model(model_name, pretrained=False, num_classes=7)
    model.add_task('t', 5)
    model.train()
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.manual_seed(0)
    out = model(x)
    state = model.state_dict()
    model.set_grad_checkpointing(True)
    model.load_state_dict(state)  # undo the running-stat update of the first pass
    out_ckpt = model(x)
    assert torch.allclose(out, out_ckpt, atol=1e-6)
    out_ckpt.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('model_name', MODELS)
@pytest.mark.parametrize('with_task', [False, True])
def test_model_backward(model_name, with_task):
    model = timm.create_model(model_name, pretrained=False, num_classes=42)
    if with_task:
        model.add_task('t', 42)
    num_params = sum(x.numel() for x in model.parameters())
    model.train()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    out.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f'No gradient for {n}'
    num_grad = sum(x.grad.numel() for x in model.parameters() if x.grad is not None)
    assert out.shape[-1] == 42
    assert num_params == num_grad
    assert not torch.isnan(out).any()


@pytest.mark.parametrize('model_name', MODELS)
def test_model_default_cfgs(model_name):
    model = timm.create_model(model_name, pretrained=False).eval()
    model.add_task('t', 3)  # checks must hold with a modulated task active too
    state_dict = model.state_dict()
    cfg = model.pretrained_cfg
    pool_size = cfg['pool_size']
    x = torch.randn(1, *cfg['input_size'])
    out = model.forward_features(x)
    assert out.shape[-2:] == pool_size
    assert out.shape[1] == model.num_features
    assert model.head_hidden_size == model.num_features
    model.reset_classifier(0)
    out = model(x)
    assert out.ndim == 2 and out.shape[-1] == model.num_features
    model.reset_classifier(0, '')
    out = model(x)
    assert out.ndim == 4 and out.shape[-2:] == pool_size
    assert cfg['classifier'] + '.weight' in state_dict
    assert cfg['first_conv'] + '.weight' in state_dict


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward_torchscript(model_name):
    with timm.layers.set_scriptable(True):
        model = timm.create_model(model_name, pretrained=False)
    model.add_task('t', 4)
    model.eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        out = scripted(x)
        assert out.shape == (1, 4)
        assert torch.allclose(out, model(x), atol=1e-5)


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward_features(model_name):
    model = timm.create_model(model_name, pretrained=False, features_only=True).eval()
    expected_channels = model.feature_info.channels()
    assert len(expected_channels) >= 4
    model.add_task('t', 3)
    outputs = model(torch.randn(1, 3, SIZE, SIZE))
    assert len(outputs) == len(expected_channels)
    for e, o in zip(expected_channels, outputs):
        assert o.shape[:2] == (1, e)
        assert not torch.isnan(o).any()
    assert 't' in model.tasks


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward_intermediates(model_name):
    model = timm.create_model(model_name, pretrained=False).eval()
    model.add_task('t', 3)
    x = torch.randn(1, 3, SIZE, SIZE)
    feat_info = model.feature_info
    final, intermediates = model.forward_intermediates(x)
    assert len(intermediates) == len(feat_info)
    for info, o in zip(feat_info, intermediates):
        assert o.shape[1] == info['num_chs']
        assert o.shape[-1] == SIZE // info['reduction']
    assert torch.allclose(final, model.forward_features(x), atol=1e-5)
    only = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(only, intermediates))


def _fx_model(model, train: bool):
    model.train(train)
    train_nodes, eval_nodes = get_graph_node_names(model)
    return create_feature_extractor(model, return_nodes=[(train_nodes if train else eval_nodes)[-1]])


@pytest.mark.parametrize('model_name', MODELS)
def test_model_forward_fx(model_name):
    model = timm.create_model(model_name, pretrained=False).eval()
    model.add_task('t', 6)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        eager = model(x)
        fx_model = _fx_model(model, train=False).eval()
        fx_out = fx_model(x)
    fx_out = tuple(fx_out.values())[0] if isinstance(fx_out, dict) else fx_out
    assert torch.equal(fx_out, eager)


@pytest.mark.parametrize('model_name', MODELS)
def test_model_backward_fx(model_name):
    model = timm.create_model(model_name, pretrained=False, num_classes=42)
    model.add_task('t', 42)
    num_params = sum(x.numel() for x in model.parameters())
    model.train()
    fx_model = _fx_model(model, train=True).train()
    out = fx_model(torch.randn(2, 3, SIZE, SIZE))
    out = torch.cat(list(out.values())) if isinstance(out, dict) else out
    out.mean().backward()
    for n, x in fx_model.named_parameters():
        assert x.grad is not None, f'No gradient for {n}'
    assert sum(x.grad.numel() for x in fx_model.parameters()) == num_params
    assert out.shape[-1] == 42


def test_torch_compile_runs():
    model = timm.create_model('modcl_mobilenetv2_050', pretrained=False).eval()
    model.add_task('t', 3)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        # aot_eager: dynamo capture + AOT autograd without inductor's C++ codegen (minutes on 2 CPU cores)
        compiled = torch.compile(model, backend='aot_eager')
        out = compiled(x)
    assert torch.allclose(out, eager, atol=1e-4)

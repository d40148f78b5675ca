"""Pretrained backbones offline, and adapter files written by timm_modcl 0.1."""
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

DATA = Path(__file__).parent / 'data'


def test_adapter_written_by_0_1_loads_with_identical_outputs(pretrained_model_factory, tmp_path):
    """A real 0.1 adapter (format 1: no config; made by 0.1's code on the offline ImageNet MobileNetV2, fp16, with a
    per-layer resolution override) loads; its config is rebuilt from its tensors and its logits are unchanged."""
    model = pretrained_model_factory()
    adapter = DATA / 'modcl_0.1_mobilenetv2_100.safetensors'
    expected = load_file(DATA / 'modcl_0.1_mobilenetv2_100.expected.safetensors')
    with safe_open(DATA / 'modcl_0.1_mobilenetv2_100.expected.safetensors', 'pt') as f:
        meta = f.metadata()
    assert model.backbone_fingerprint() == meta['fingerprint']  # same fingerprint as 0.1 computed
    info = model.load_task(adapter, activate=True)
    assert info.num_modulator_params == int(meta['num_modulator_params'])
    assert info.config.resolution == (8, 8) and info.config.variant == 'paper'
    assert info.class_names == ('w', 'x', 'y', 'z') and info.metadata['note'] == 'written by timm_modcl 0.1'
    model.eval()
    with torch.no_grad():
        logits = model(expected['input'])
    # the same tensors; convolution rounding differs with the thread count the logits were computed with (2 here)
    torch.testing.assert_close(logits, expected['logits'], rtol=1e-5, atol=1e-5)
    # re-saved, it is a format-2 file with an explicit config that round-trips bit for bit
    data = model.save_task('legacy', tmp_path / 'resaved.safetensors')
    fresh = pretrained_model_factory()
    fresh.load_task(data, activate=True)
    assert fresh.tasks['legacy'].config == info.config
    with torch.no_grad():
        assert torch.equal(fresh.eval()(expected['input']), logits)

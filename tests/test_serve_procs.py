"""``modcl serve`` as processes: two replicas on two ports (the documented scale-out), client processes checking
every answer against offline references, hot add on every replica, the Hub as a source, and the CLI's refusals."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from _subproc import run_bounded
from conftest import ALICE
from test_serve import ARCH, IMAGES, SIZE, assert_logits, check_error, files, make_adapters, references, serve

ROOT = Path(__file__).resolve().parents[1]

CLIENT = r'''
import json, sys, httpx, torch
urls, refs_file, n, seed = sys.argv[1].split(','), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
refs = json.load(open(refs_file))
images = [bytes.fromhex(h) for h in refs.pop('_images')]
tasks = sorted(refs)
wrong = 0
with httpx.Client(timeout=60) as c:
    for k in range(n):
        task, i, url = tasks[(k + seed) % len(tasks)], (k * 7 + seed) % len(images), urls[k % len(urls)]
        r = c.post(f'{url}/v1/tasks/{task}/predict?logits=true', files=[('file', ('a.png', images[i], 'image/png'))])
        assert r.status_code == 200, r.text
        p = r.json()['predictions'][0]
        ok = p['task'] == task and torch.allclose(torch.tensor(p['logits']), torch.tensor(refs[task][i]), atol=2e-4)
        wrong += not ok
print(json.dumps({'answers': n, 'wrong': wrong}))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', **extra)
    env.pop('MODCL_API_KEY', None)
    return env


class Replica:
    """``modcl serve`` in a process of its own on a free port of 127.0.0.1."""

    def __init__(self, args, log: Path, env=None):
        self.port = _free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log_path = log
        self.log = open(log, 'w')  # a file, not a pipe: a full pipe would block the server's logging
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'timm_modcl', 'serve', *map(str, args), '--port', str(self.port), '--threads', '1'],
            env=env or _env(), stdout=self.log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.result = None

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f'modcl serve exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}')
            try:
                if httpx.get(f'{self.url}/readyz', timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f'modcl serve was not ready within {timeout} s')

    def stop(self):
        """SIGTERM (a graceful shutdown), then ``(exit code, output)``; idempotent."""
        if self.result is None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            self.log.close()
            self.result = self.proc.returncode, self.log_path.read_text()
        return self.result


@pytest.mark.slow
def test_two_replicas_client_processes_and_hot_add_on_each(tmp_path):
    folder = make_adapters(tmp_path / 'adapters', {'cats': 3, 'dogs': 4, 'birds': 5})
    refs = references(folder, IMAGES)
    replicas = [Replica(['--out', folder, '--no-pretrained', '--input-size', SIZE, '--max-wait-ms', 3],
                        tmp_path / f'replica{k}.log') for k in range(2)]
    try:
        for r in replicas:
            r.wait_ready()
        refs_file = tmp_path / 'refs.json'
        refs_file.write_text(json.dumps({**{t: [z.tolist() for z in zs] for t, zs in refs.items()},
                                         '_images': [b.hex() for b in IMAGES]}))
        urls = ','.join(r.url for r in replicas)
        # two client processes at once, round robin over the two replicas
        clients = [subprocess.Popen([sys.executable, '-c', CLIENT, urls, str(refs_file), '24', str(seed)],
                                    env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for seed in range(2)]
        for c in clients:
            out, _ = c.communicate(timeout=300)
            assert c.returncode == 0, out[-3000:]
            assert json.loads(out.strip().splitlines()[-1]) == {'answers': 24, 'wrong': 0}
        # a new task written into the shared folder, then added on every replica (what a rollout script does)
        model = __import__('timm_modcl.cli', fromlist=['_create'])._create(ARCH)
        model.load_tasks(folder)
        model.add_task('owls', num_classes=2, class_names=['barn', 'snowy'], activate=False)
        model.save_tasks(folder)
        new_refs = references(folder, IMAGES[:2])
        for r in replicas:
            resp = httpx.put(f'{r.url}/v1/tasks/owls', json={'source': 'folder'}, timeout=60)
            assert resp.status_code == 201, resp.text
        answers = []
        for r in replicas:
            p = httpx.post(f'{r.url}/v1/tasks/owls/predict?logits=true', files=files(IMAGES[1]),
                           timeout=60).json()['predictions'][0]
            assert_logits(p, new_refs, 1)
            answers.append(p['logits'])
        assert answers[0] == answers[1]
        # structured logs: one JSON object per request line
        code, out = replicas[0].stop()
        # uvicorn shuts down gracefully, then re-raises SIGTERM to exit with it
        assert code in (0, -signal.SIGTERM) and 'Application shutdown complete' in out, out[-2000:]
        lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{')]
        assert any(ln.get('event') == 'request' and ln.get('status') == 201 for ln in lines)
        assert any(ln.get('event') == 'task_loaded' and ln.get('task') == 'owls' for ln in lines)
    finally:
        for r in replicas:
            r.stop()


def test_hub_repo_as_source_at_start_and_while_serving(hub, tmp_path, monkeypatch):
    from timm_modcl import push_tasks
    from timm_modcl.cli import _create
    folder = make_adapters(tmp_path / 'a', {'cats': 3, 'dogs': 4})
    m = _create(ARCH)
    m.load_tasks(folder)
    push_tasks(m, 'alice/pets', ['cats'], token=ALICE, endpoint=hub.url)
    from huggingface_hub import HfApi
    HfApi(endpoint=hub.url, token=ALICE).create_tag('alice/pets', tag='v1')
    push_tasks(m, 'alice/pets', ['dogs'], token=ALICE, endpoint=hub.url)
    refs = references(folder, IMAGES[:2])
    with serve(folder, hub_endpoint=hub.url, hub_cache_dir=str(tmp_path / 'cache')) as s, \
            httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.put('/v1/tasks/pets-dogs', json={'repo_id': 'alice/pets', 'name': 'dogs'})
        assert r.status_code == 201 and r.json()['num_classes'] == 4, r.text
        p = c.post('/v1/tasks/pets-dogs/predict?logits=true', files=files(IMAGES[0])).json()['predictions'][0]
        assert torch.allclose(torch.tensor(p['logits']), refs['dogs'][0], atol=2e-4)
        check_error(c.put('/v1/tasks/x', json={'repo_id': 'alice/pets', 'name': 'dogs', 'revision': 'v1'}), 502,
                    'hub_error')  # the v1 tag has no dogs
        check_error(c.put('/v1/tasks/x', json={'repo_id': 'alice/none'}), 502, 'hub_error')
        assert [t['name'] for t in c.get('/v1/tasks').json()['tasks']] == ['cats', 'dogs', 'pets-dogs']
    # the CLI serving a Hub repo at a revision
    env = _env(HF_HOME=str(tmp_path / 'hf'), HF_HUB_DISABLE_TELEMETRY='1')
    rep = Replica(['--repo-id', 'alice/pets', '--revision', 'v1', '--endpoint', hub.url, '--no-pretrained',
                   '--input-size', SIZE], tmp_path / 'hub.log', env=env)
    try:
        rep.wait_ready()
        assert [t['name'] for t in httpx.get(f'{rep.url}/v1/tasks').json()['tasks']] == ['cats']
        p = httpx.post(f'{rep.url}/v1/tasks/cats/predict?logits=true', files=files(IMAGES[1]),
                       timeout=60).json()['predictions'][0]
        assert_logits(p, refs, 1)
    finally:
        rep.stop()


def test_cli_refusals(tmp_path):
    folder = make_adapters(tmp_path / 'a', {'cats': 3})
    cmd = [sys.executable, '-m', 'timm_modcl', 'serve', '--out', str(folder), '--no-pretrained']
    code, out = run_bounded(cmd + ['--host', '0.0.0.0'], 120, env=_env())
    assert code == 2 and '--api-key' in out and 'Traceback' not in out, out
    code, out = run_bounded([sys.executable, '-m', 'timm_modcl', 'serve'], 120, env=_env())
    assert code == 2 and '--out DIR' in out, out
    code, out = run_bounded(cmd + ['--task', 'nope'], 120, env=_env())
    assert code == 2 and "no task 'nope'" in out, out
    # without the serve extra: the install hint, not a traceback
    hide = ("import sys; sys.modules['fastapi'] = None; from timm_modcl.cli import main; "
            f"sys.exit(main(['serve', '--out', {str(folder)!r}, '--no-pretrained']))")
    code, out = run_bounded([sys.executable, '-c', hide], 120, env=_env())
    assert code == 2 and 'pip install "timm_modcl[serve]"' in out and 'Traceback' not in out, out

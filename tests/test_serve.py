"""``modcl serve``: the HTTP API through a real HTTP client on 127.0.0.1 (server in a thread of this process).

Every answer is checked against logits computed offline with the plain model API (``use_task`` + forward), so an
answer from the wrong task (or the wrong version of a task) fails the test. The helpers here are shared by the other
``test_serve_*`` files.
"""
import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from timm_modcl.cli import _create
from timm_modcl.data import eval_transform
from timm_modcl.serve import ServeConfig, create_app, folder_adapters

ARCH = 'modcl_mobilenetv2_050'
SIZE = 32
ATOL = 2e-4  # batched vs single-image CPU kernels differ by float rounding only


# ------------------------------------------------------------------------------------------------- helpers
def make_adapters(directory: Path, tasks, seed: int = 0):
    """Save tasks ``{name: num_classes}`` of the seeded random ``ARCH`` backbone (what ``--no-pretrained`` builds)
    with perturbed modulators and random heads, so every task computes something different."""
    model = _create(ARCH)
    g = torch.Generator().manual_seed(seed)
    for name, k in tasks.items():
        model.add_task(name, num_classes=k, class_names=[f'{name}-c{i}' for i in range(k)], activate=False)
        with torch.no_grad():
            for p in model.task_parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_tasks(directory, names=list(tasks))
    return directory


def png(seed: int, size=(40, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, 'PNG')
    return buf.getvalue()


def references(directory: Path, images, input_size: int = SIZE):
    """``{task: [logits of each image]}`` computed offline: a fresh model, ``use_task``, one image at a time."""
    model = _create(ARCH)
    model.load_tasks(directory)
    model.eval()
    t = eval_transform(model, input_size)
    out = {}
    with torch.no_grad():
        for name in folder_adapters(directory):
            with model.use_task(name):
                out[name] = [model(t(Image.open(io.BytesIO(b)).convert('RGB'))[None])[0] for b in images]
    return out


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a thread of this process."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(('127.0.0.1', 0))
        self.url = f'http://127.0.0.1:{self.sock.getsockname()[1]}'
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, log_level='warning'))
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.sock]), daemon=True)

    @property
    def worker(self):
        return self.app.state.server.worker

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, 'the server did not start'
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive()


def serve(directory, **config) -> LiveServer:
    config.setdefault('input_size', SIZE)
    return LiveServer(create_app(_create(ARCH), ServeConfig(adapters_dir=str(directory), **config),
                                 initial=folder_adapters(directory)))


def files(*blobs):
    return [('file', (f'{i}.png', b, 'image/png')) for i, b in enumerate(blobs)]


def check_error(r, status, code=None):
    assert r.status_code == status, r.text
    assert r.headers['content-type'].startswith('application/json')
    err = r.json()['error']
    assert err['status'] == status and err['message']
    if code:
        assert err['code'] == code, err
    return err


def assert_logits(pred, refs, i, atol=ATOL):
    got = torch.tensor(pred['logits'])
    want = refs[pred['task']][i]
    assert got.shape == want.shape and torch.allclose(got, want, atol=atol, rtol=0), \
        (pred['task'], (got - want).abs().max() if got.shape == want.shape else got.shape)


# -------------------------------------------------------------------------------------------------- fixtures
TASKS = {'cats': 3, 'dogs': 4, 'birds': 5, 'fish': 2}
IMAGES = [png(i) for i in range(6)]


@pytest.fixture(scope='module')
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp('adapters'), TASKS)


@pytest.fixture(scope='module')
def refs(adapters):
    return references(adapters, IMAGES)


@pytest.fixture(scope='module')
def live(adapters):
    with serve(adapters) as s:
        yield s


# --------------------------------------------------------------------------------------------------- tests
def test_predict_with_task_multipart_and_base64(live, refs):
    with httpx.Client(base_url=live.url, timeout=30) as c:
        tasks = c.get('/v1/tasks').json()['tasks']
        assert [t['name'] for t in tasks] == list(TASKS) and all(t['version'] == 1 for t in tasks)
        for name in TASKS:
            r = c.post(f'/v1/tasks/{name}/predict?logits=true&topk=2', files=files(*IMAGES[:3]))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body['task'] == name and body['version'] == 1 and len(body['predictions']) == 3
            for i, p in enumerate(body['predictions']):
                assert_logits(p, refs, i)
                probs = refs[name][i].softmax(0)
                assert [t['class'] for t in p['top']] == probs.topk(2).indices.tolist()
                assert p['top'][0]['name'] == f'{name}-c{p["top"][0]["class"]}'
                assert abs(p['top'][0]['prob'] - float(probs.max())) < 1e-4
        r = c.post('/v1/tasks/dogs/predict?logits=true',
                   json={'images': [base64.b64encode(IMAGES[4]).decode(),
                                    'data:image/png;base64,' + base64.b64encode(IMAGES[5]).decode()]})
        assert r.status_code == 200, r.text
        for i, p in enumerate(r.json()['predictions']):
            assert_logits(p, refs, 4 + i)


def test_task_agnostic_answers_with_the_chosen_task(live, refs):
    with httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.post('/v1/predict?logits=true', files=files(*IMAGES))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body['scorer'] == 'energy' and body['candidates'] == list(TASKS)  # no prototypes stored: energy
        for i, p in enumerate(body['predictions']):
            assert_logits(p, refs, i)
            # the chosen task is the one the energy scorer prefers on the reference logits
            energy = {t: float(z[i].logsumexp(0) - np.log(len(z[i]))) for t, z in refs.items()}
            assert p['task'] == max(energy, key=energy.get) and 0 < p['task_prob'] <= 1
        r = c.post('/v1/predict?logits=true&tasks=fish,cats', files=files(IMAGES[0]))
        assert r.json()['candidates'] == ['fish', 'cats'] and r.json()['predictions'][0]['task'] in ('fish', 'cats')
        check_error(c.post('/v1/predict?tasks=nope', files=files(IMAGES[0])), 404, 'task_not_found')


def test_bad_input_is_a_json_4xx_and_the_server_keeps_serving(adapters, refs, tmp_path):
    huge = io.BytesIO()
    Image.new('RGB', (3000, 3000)).save(huge, 'PNG')  # 9 MP, a few KiB
    with serve(adapters, max_body_bytes=2 ** 20, max_pixels=4_000_000) as s, \
            httpx.Client(base_url=s.url, timeout=30) as c:
        check_error(c.post('/v1/tasks/nope/predict', files=files(IMAGES[0])), 404, 'task_not_found')
        check_error(c.post('/v1/tasks/cats/predict', files=files(b'not an image at all')), 400, 'invalid_image')
        check_error(c.post('/v1/tasks/cats/predict', files=files(IMAGES[0][:60])), 400, 'invalid_image')  # truncated
        check_error(c.post('/v1/tasks/cats/predict', files=files(b'')), 400, 'invalid_image')
        check_error(c.post('/v1/tasks/cats/predict', files=files(huge.getvalue())), 413, 'payload_too_large')
        check_error(c.post('/v1/tasks/cats/predict', content=IMAGES[0], headers={'content-type': 'image/png'}),
                    415, 'unsupported_media_type')
        check_error(c.post('/v1/tasks/cats/predict', content=b'x', headers={'content-type': 'text/plain'}), 415)
        check_error(c.post('/v1/tasks/cats/predict', files=files(b'\0' * (2 ** 20 + 10))), 413, 'payload_too_large')
        # a streamed (chunked) body without Content-Length is cut off at the limit too
        head = b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        check_error(c.post('/v1/tasks/cats/predict', content=iter([head] + [b'\0' * 2 ** 19] * 4),
                           headers={'content-type': 'multipart/form-data; boundary=xx'}), 413, 'payload_too_large')
        check_error(c.post('/v1/tasks/cats/predict', json={'images': ['%%% not base64']}), 400)
        check_error(c.post('/v1/tasks/cats/predict', json={'pictures': []}), 400)
        check_error(c.post('/v1/tasks/cats/predict', content=b'{bad json',
                           headers={'content-type': 'application/json'}), 400)
        check_error(c.post('/v1/tasks/cats/predict', data={'file': 'text'}), 415)  # urlencoded form
        check_error(c.post('/v1/tasks/cats/predict', data={'file': 'text, not a file'},
                           files={'other': ('x', b'1')}), 400, 'invalid_image')
        check_error(c.post('/v1/tasks/cats/predict', files={'other': ('x', IMAGES[0])}), 400, 'invalid_image')
        check_error(c.post('/v1/tasks/cats/predict?topk=0', files=files(IMAGES[0])), 400)
        check_error(c.post('/v1/tasks/cats/predict?topk=abc', files=files(IMAGES[0])), 422, 'invalid_request')
        check_error(c.post('/v1/predict?scorer=magic', files=files(IMAGES[0])), 400)
        check_error(c.get('/no/such/route'), 404, 'not_found')
        check_error(c.get('/v1/tasks/cats/predict'), 405)
        # still serving, with the right answers, and nothing leaked: no references held, no queued images
        r = c.post('/v1/tasks/cats/predict?logits=true', files=files(IMAGES[1]))
        assert r.status_code == 200
        assert_logits(r.json()['predictions'][0], refs, 1)
        assert all(v.refs == 0 for v in s.worker.tasks()) and s.worker.queue_length() == 0


def test_concurrent_clients_mixed_tasks_are_batched_and_never_cross(live, refs):
    rng = np.random.default_rng(0)
    plan = [(str(rng.choice(list(TASKS))), int(rng.integers(len(IMAGES)))) for _ in range(160)]
    batches0 = live.worker.batches

    def one(item):
        task, i = item
        with httpx.Client(base_url=live.url, timeout=60) as c:
            r = c.post(f'/v1/tasks/{task}/predict?logits=true', files=files(IMAGES[i]))
        assert r.status_code == 200, r.text
        p = r.json()['predictions'][0]
        assert p['task'] == task
        assert_logits(p, refs, i)
        return task

    with ThreadPoolExecutor(16) as ex:
        done = list(ex.map(one, plan))
    assert len(done) == len(plan)
    batches = live.worker.batches - batches0
    assert batches < len(plan), f'{batches} batches for {len(plan)} concurrent images: nothing was batched'
    text = httpx.get(f'{live.url}/metrics').text
    assert 'modcl_batch_size_bucket{le="1.0"}' in text
    hits = [ln for ln in text.splitlines() if ln.startswith('modcl_cache_hits_total{')]
    assert hits and sum(float(ln.split()[-1]) for ln in hits) > 0  # the default cache keeps the 4 tasks' weights
    assert 'modcl_cache_evictions_total{' not in text


def test_in_flight_requests_finish_on_their_version(adapters, refs, tmp_path):
    new = make_adapters(tmp_path / 'v2', {'cats': 3, 'owls': 2}, seed=7)
    new_refs = references(new, IMAGES)
    with serve(adapters) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        gate = threading.Event()
        s.worker.call(gate.wait)  # the worker waits here: what is submitted now stays queued
        with ThreadPoolExecutor(4) as ex:
            old = [ex.submit(c.post, '/v1/tasks/cats/predict?logits=true', files=files(IMAGES[i])) for i in range(3)]
            deadline = time.time() + 20
            while s.worker.queue_length() < 3:
                assert time.time() < deadline
                time.sleep(0.01)
            # replace cats and remove dogs while the three requests wait (the change runs before them)
            put = ex.submit(c.put, '/v1/tasks/cats', files={'file': ('a', (new / 'cats' / 'adapter_model.safetensors')
                                                                      .read_bytes())})
            dele = ex.submit(c.delete, '/v1/tasks/dogs')
            time.sleep(0.2)
            gate.set()
            r = put.result(30)
            assert r.status_code == 200 and r.json()['version'] == 2 and r.json()['replaced'] is True, r.text
            assert dele.result(30).json() == {'task': 'dogs', 'version': 1, 'removed': True}
            for i, f in enumerate(old):
                p = f.result(30).json()['predictions'][0]
                assert (p['task'], p['version']) == ('cats', 1)
                assert_logits(p, refs, i)
        p = c.post('/v1/tasks/cats/predict?logits=true', files=files(IMAGES[0])).json()['predictions'][0]
        assert p['version'] == 2
        assert_logits(p, new_refs, 0)
        check_error(c.post('/v1/tasks/dogs/predict', files=files(IMAGES[0])), 404, 'task_not_found')
        # the old version left the model once its last request was answered
        assert sorted(n.split('--', 1)[1] for n in s.worker.loaded_internal()) == ['birds', 'cats', 'fish']
        assert len(s.worker.model.tasks) == 4  # base + the three current versions


def test_hot_add_replace_remove_under_load(adapters, refs, tmp_path):
    v2 = make_adapters(tmp_path / 'v2', {'birds': 5, 'newt': 3}, seed=11)
    refs2 = references(v2, IMAGES)
    stop = threading.Event()
    errors, answers = [], []

    with serve(adapters) as s:
        def client(k):
            rng = np.random.default_rng(k)
            with httpx.Client(base_url=s.url, timeout=60) as c:
                while not stop.is_set():
                    task = str(rng.choice(['cats', 'birds', 'newt', 'fish']))
                    i = int(rng.integers(len(IMAGES)))
                    r = c.post(f'/v1/tasks/{task}/predict?logits=true', files=files(IMAGES[i]))
                    if r.status_code == 404:
                        assert r.json()['error']['code'] == 'task_not_found'
                        continue
                    try:
                        assert r.status_code == 200, r.text
                        p = r.json()['predictions'][0]
                        assert p['task'] == task
                        # version 1 of every task is the first folder; birds v2 and newt v1 come from the second
                        fresh = (task == 'birds' and p['version'] == 2) or task == 'newt'
                        assert_logits(p, refs2 if fresh else refs, i)
                        answers.append((task, p['version']))
                    except AssertionError as e:
                        errors.append(e)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        def seen(*pairs):  # wait until the clients got answers from these (task, version) pairs
            deadline = time.time() + 120
            while not set(pairs) <= set(answers):
                assert time.time() < deadline and not errors, (pairs, set(answers), errors[:2])
                time.sleep(0.05)

        with httpx.Client(base_url=s.url, timeout=60) as c:
            seen(('birds', 1), ('cats', 1), ('fish', 1))
            blob = (v2 / 'newt' / 'adapter_model.safetensors').read_bytes()
            assert c.put('/v1/tasks/newt', files={'file': ('newt', blob)}).status_code == 201
            seen(('newt', 1))
            blob = (v2 / 'birds' / 'adapter_model.safetensors').read_bytes()
            assert c.put('/v1/tasks/birds', files={'file': ('birds', blob)}).json()['version'] == 2
            seen(('birds', 2))
            assert c.delete('/v1/tasks/fish').status_code == 200
            time.sleep(0.3)
            # re-add fish from the server's folder: version 2, same adapter as version 1
            r = c.put('/v1/tasks/fish', json={'source': 'folder'})
            assert r.status_code == 201 and r.json()['version'] == 2, r.text
            seen(('fish', 2))
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert sorted(v.name for v in s.worker.tasks()) == ['birds', 'cats', 'dogs', 'fish', 'newt']
        assert all(v.refs == 0 for v in s.worker.tasks())
        assert len(s.worker.model.tasks) == 6  # base + five: every replaced or removed version is gone


def test_write_endpoints_need_the_api_key_and_validate(adapters, refs):
    blob = (adapters / 'cats' / 'adapter_model.safetensors').read_bytes()
    with serve(adapters, api_key='s3cret') as s, httpx.Client(base_url=s.url, timeout=30) as c:
        check_error(c.put('/v1/tasks/lion', files={'file': ('a', blob)}), 401, 'unauthorized')
        check_error(c.put('/v1/tasks/lion', files={'file': ('a', blob)}, headers={'x-api-key': 'wrong'}), 401)
        check_error(c.delete('/v1/tasks/cats', headers={'authorization': 'Bearer nope'}), 401)
        key = {'authorization': 'Bearer s3cret'}
        check_error(c.put('/v1/tasks/lion', files={'file': ('a', b'garbage')}, headers=key), 422, 'invalid_adapter')
        check_error(c.put('/v1/tasks/bad.name', files={'file': ('a', blob)}, headers=key), 422, 'invalid_task_name')
        check_error(c.put('/v1/tasks/lion', content=blob, headers={**key, 'content-type': 'application/octet-stream'}),
                    415)
        check_error(c.put('/v1/tasks/lion', json={'source': 'folder'}, headers=key), 404, 'task_not_found')
        check_error(c.put('/v1/tasks/lion', json={'source': 'ftp'}, headers=key), 400)
        check_error(c.delete('/v1/tasks/lion', headers=key), 404)
        assert [t['name'] for t in c.get('/v1/tasks').json()['tasks']] == list(TASKS)  # nothing changed
        r = c.put('/v1/tasks/lion', files={'file': ('a', blob)}, headers={'x-api-key': 's3cret'})
        assert r.status_code == 201 and r.json()['num_classes'] == 3, r.text
        p = c.post('/v1/tasks/lion/predict?logits=true', files=files(IMAGES[2])).json()['predictions'][0]
        assert p['task'] == 'lion' and torch.allclose(torch.tensor(p['logits']), refs['cats'][2], atol=ATOL)
        assert c.delete('/v1/tasks/cats', headers=key).json()['removed'] is True


def test_queue_full_is_429_and_shutdown_is_503_with_retry_after(adapters):
    with serve(adapters, max_queue=4) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        gate = threading.Event()
        s.worker.call(gate.wait)
        try:
            err = c.post('/v1/tasks/cats/predict', files=files(*IMAGES[:5]))
            check_error(err, 429, 'queue_full')
            assert err.headers['retry-after'] == '1'
            assert all(v.refs == 0 for v in s.worker.tasks())  # the refused images hold nothing
        finally:
            gate.set()
        assert c.post('/v1/tasks/cats/predict', files=files(*IMAGES[:4])).status_code == 200
        assert 'modcl_rejected_total 1.0' in c.get('/metrics').text
        s.worker.close()
        r = c.post('/v1/tasks/cats/predict', files=files(IMAGES[0]))
        check_error(r, 503, 'not_ready')
        assert r.headers['retry-after'] == '1'
        check_error(c.get('/readyz'), 503)
        assert c.get('/healthz').json() == {'status': 'ok'}


def test_health_metrics_openapi_and_cache_evictions(adapters):
    model = _create(ARCH)
    model.set_weight_cache_limit(1)  # every task switch evicts the previous task's weights
    app = create_app(model, ServeConfig(input_size=SIZE), initial=folder_adapters(adapters))
    with LiveServer(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get('/healthz').json() == {'status': 'ok'}
        assert c.get('/readyz').json()['status'] == 'ready'
        for task in ['cats', 'dogs', 'cats', 'dogs', 'dogs']:
            assert c.post(f'/v1/tasks/{task}/predict', files=files(IMAGES[0])).status_code == 200
        text = c.get('/metrics').text
        for needle in ('modcl_requests_total{endpoint="/v1/tasks/{task}/predict",method="POST",status="200"} 5.0',
                       'modcl_request_latency_seconds_bucket', 'modcl_batch_size_count 5.0', 'modcl_queue_length 0.0',
                       # the most recently used task's weights stay until another task needs the room, so the last
                       # 'dogs' is a hit
                       'modcl_cache_evictions_total{task="cats"} 2.0', 'modcl_cache_evictions_total{task="dogs"} 1.0',
                       'modcl_cache_misses_total{task="dogs"} 2.0', 'modcl_cache_misses_total{task="cats"} 2.0',
                       'modcl_cache_hits_total{task="dogs"} 1.0',
                       'modcl_images_total{task="dogs"} 3.0', 'modcl_tasks 4.0'):
            assert needle in text, needle
        schema = c.get('/openapi.json').json()
        for path in ('/v1/tasks/{task}/predict', '/v1/predict', '/v1/tasks/{task}', '/v1/tasks', '/metrics'):
            assert path in schema['paths'], path
        assert 'multipart/form-data' in schema['paths']['/v1/predict']['post']['requestBody']['content']
        page = c.get('/')
        assert page.status_code == 200 and '<select id="task">' in page.text
        assert 'http://' not in page.text and 'https://' not in page.text  # no external assets


def test_structured_logs(adapters, capsys):
    import logging

    from timm_modcl.serve import JsonFormatter
    rec = logging.LogRecord('timm_modcl.serve', logging.INFO, __file__, 1, 'request', None, None)
    rec.status, rec.path = 200, '/v1/predict'
    line = json.loads(JsonFormatter().format(rec))
    assert line['msg'] == 'request' and line['status'] == 200 and line['path'] == '/v1/predict'
    assert line['level'] == 'info'

"""Load test of ``modcl serve`` on loopback (bounded in count and time: about 5 minutes on 2 CPU cores).

    nice -n 10 python benchmarks/serve_load.py            # writes benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --quick                # a smoke run (seconds), writes serve_load_quick.json

Backbone: ``modcl_mobilenetv2_050``, the seeded random backbone of ``--no-pretrained`` (throughput does not depend on
the weights), 64 px inputs, tasks at the library's default configuration with perturbed modulators and random heads
(2-10 classes), so every task computes something different. The server is ``modcl serve`` in its own process with 1
torch thread; the clients are asyncio + httpx in this process (the other core). Each request is one 64x64 PNG for
one task chosen at random; every answer's logits are compared with references computed offline (plain model API,
``use_task``, one image at a time; ``atol=2e-4``), so an answer from the wrong task counts as wrong.

Settings: 16 and 64 concurrent clients over 1, 16 and 100 tasks; one request at a time (1 client) for each task
count; the same with the batcher off (``--max-batch 1``); and, for 16 tasks, one server per task (16 processes, each
client request sent to its task's server). A last long run over 100 tasks with a 4 MiB weight cache (tasks evicted
all the time) samples the server's resident memory every second. Each setting runs for a fixed time after a warm-up;
throughput is answers per second, latency percentiles are per request as the client sees them.
"""
import argparse
import asyncio
import io
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ARCH = 'modcl_mobilenetv2_050'
SIZE = 64
ATOL = 2e-4


def make_adapters(directory: Path, n: int) -> Dict[str, int]:
    from timm_modcl.cli import _create
    model = _create(ARCH)
    g = torch.Generator().manual_seed(0)
    tasks = {f't{i:03d}': 2 + i % 9 for i in range(n)}
    for name, k in tasks.items():
        model.add_task(name, num_classes=k, activate=False)
        with torch.no_grad():
            for p in model.task_parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_tasks(directory)
    return tasks


def images(n: int) -> List[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, 'PNG')
        out.append(buf.getvalue())
    return out


def references(directory: Path, blobs: List[bytes]) -> Dict[str, List[torch.Tensor]]:
    from timm_modcl.cli import _create
    from timm_modcl.data import eval_transform
    model = _create(ARCH)
    model.load_tasks(directory)
    model.eval()
    t = eval_transform(model, SIZE)
    xs = torch.stack([t(Image.open(io.BytesIO(b)).convert('RGB')) for b in blobs])
    out = {}
    with torch.no_grad():
        for name in model.tasks:
            if name != 'base':
                with model.use_task(name):
                    out[name] = [model(x[None])[0] for x in xs]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path, *extra: str, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log = open(log_dir / f'server-{self.port}.log', 'w')
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'timm_modcl', 'serve', '--out', str(folder), '--no-pretrained', '--input-size',
             str(SIZE), '--threads', '1', '--log-level', 'warning', '--port', str(self.port), *extra],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)

    def wait(self, timeout: float = 180) -> 'Server':
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f'server exited: {Path(self.log.name).read_text()[-2000:]}')
            try:
                if httpx.get(self.url + '/readyz', timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError('server not ready')

    def rss_mib(self) -> float:
        return self.ps.memory_info().rss / 2 ** 20

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


async def load(urls: Dict[str, str], tasks: List[str], blobs: List[bytes], refs, clients: int, seconds: float,
               warmup: float, seed: int = 0, sampler=None) -> Dict[str, float]:
    """``clients`` concurrent clients for ``warmup + seconds``; stats of the requests that started after warm-up."""
    lat: List[float] = []
    counts = dict(ok=0, wrong=0, errors=0, rejected=0)
    t0 = time.perf_counter()
    t_start, t_end = t0 + warmup, t0 + warmup + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(k: int, c: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + k)
        while True:
            now = time.perf_counter()
            if now >= t_end:
                return
            task, i = rng.choice(tasks), rng.randrange(len(blobs))
            try:
                r = await c.post(f'{urls[task]}/v1/tasks/{task}/predict?logits=true',
                                 files=[('file', ('a.png', blobs[i], 'image/png'))])
            except httpx.HTTPError:
                counts['errors'] += 1
                continue
            done = time.perf_counter()
            counted = t_start <= done <= t_end  # throughput and latency: answers completed in the window
            if r.status_code == 429:
                counts['rejected'] += counted
                continue
            if r.status_code != 200:
                counts['errors'] += 1
                continue
            p = r.json()['predictions'][0]
            z = torch.tensor(p['logits'])
            ok = p['task'] == task and z.shape == refs[task][i].shape and bool(
                torch.allclose(z, refs[task][i], atol=ATOL, rtol=0))
            counts['ok' if ok else 'wrong'] += 1  # every answer is checked, in the window or not
            if counted:
                lat.append(done - now)

    async def sample() -> None:
        while time.perf_counter() < t_end:
            sampler(time.perf_counter() - t0)
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        jobs = [client(k, c) for k in range(clients)] + ([sample()] if sampler else [])
        await asyncio.gather(*jobs)
    ms = np.array(lat) * 1000
    return dict(clients=clients, tasks=len(tasks), seconds=seconds, answers=len(lat),
                checked=counts['ok'] + counts['wrong'],
                throughput=round(len(lat) / seconds, 1),
                p50_ms=round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
                p99_ms=round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
                wrong=counts['wrong'], errors=counts['errors'], rejected_429=counts['rejected'])


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + '/metrics', timeout=10).text.splitlines():
        if line.startswith(name):
            total += float(line.split()[-1])
    return total


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='a smoke run: fewer tasks, seconds per setting')
    ap.add_argument('--seconds', type=float, default=None, help='measured seconds per setting (default 8; quick 2)')
    ap.add_argument('--out', default=None, help='JSON file (default benchmarks/results/serve_load[_quick].json)')
    args = ap.parse_args(argv)
    secs = args.seconds or (2.0 if args.quick else 8.0)
    warm = 1.0 if args.quick else 2.0
    long_secs = 6.0 if args.quick else 40.0
    n_max = 16 if args.quick else 100
    task_counts = [1, 16] if args.quick else [1, 16, 100]
    out = Path(args.out) if args.out else ROOT / 'benchmarks' / 'results' / (
        'serve_load_quick.json' if args.quick else 'serve_load.json')
    torch.set_num_threads(1)  # the clients' core; spinning OpenMP threads on a busy CPU slow small convs down a lot
    t_all = time.time()
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix='serve_load_'))
    folder = work / 'adapters'
    tasks = list(make_adapters(folder, n_max))
    blobs = images(4)
    refs = references(folder, blobs)
    print(f'{len(tasks)} adapters and references ready in {time.time() - t_all:.0f} s', flush=True)
    rows = []

    def run_on(server_urls, label, counts, clients_list, batched=True):
        for n in counts:
            for clients in clients_list:
                res = asyncio.run(load(server_urls(tasks[:n]), tasks[:n], blobs, refs, clients, secs, warm))
                res.update(setting=label, batching=batched)
                rows.append(res)
                print(json.dumps(res), flush=True)

    srv = Server(folder, '--max-queue', '1024', log_dir=work).wait()
    try:
        same = lambda ts: {t: srv.url for t in ts}  # noqa: E731
        run_on(same, 'one request at a time', task_counts, [1])
        run_on(same, 'concurrent, dynamic batching', task_counts, [16, 64])
        batches = metric(srv.url, 'modcl_batch_size_count')
        images_batched = metric(srv.url, 'modcl_batch_size_sum')
    finally:
        srv.stop()
    srv = Server(folder, '--max-batch', '1', '--max-queue', '1024', log_dir=work).wait()
    try:
        same = lambda ts: {t: srv.url for t in ts}  # noqa: E731
        run_on(same, 'concurrent, batching off (--max-batch 1)', [16], [16, 64], batched=False)
    finally:
        srv.stop()
    # one server per task: 16 processes (100 would not fit 2 cores' worth of process start-up and memory here)
    per_task_n = 4 if args.quick else 16
    servers: List[Server] = []
    per_task_dir = work / 'per_task'
    try:
        from timm_modcl.cli import _create
        for t in tasks[:per_task_n]:
            m = _create(ARCH)
            m.load_tasks(folder, names=[t])
            m.save_tasks(per_task_dir / t)
            servers.append(Server(per_task_dir / t, '--max-queue', '1024', log_dir=work))
        for s in servers:
            s.wait(300)
        urls = {t: s.url for t, s in zip(tasks, servers)}
        rss_each = [s.rss_mib() for s in servers]
        run_on(lambda ts: {t: urls[t] for t in ts}, f'one server per task ({per_task_n} processes)', [per_task_n],
               [16, 64])
    finally:
        for s in servers:
            s.stop()
    # memory over a long run with evictions: 100 tasks, 4 MiB of cached weights (about 3 tasks' worth)
    srv = Server(folder, '--cache-mib', '4', '--max-queue', '1024', log_dir=work).wait()
    samples = []
    try:
        res = asyncio.run(load({t: srv.url for t in tasks}, tasks, blobs, refs, 16, long_secs, warm,
                               sampler=lambda t: samples.append((round(t, 1), round(srv.rss_mib(), 1)))))
        res.update(setting='long run, 4 MiB weight cache', batching=True)
        rows.append(res)
        evictions = metric(srv.url, 'modcl_cache_evictions_total')
        print(json.dumps(res), flush=True)
    finally:
        srv.stop()
    after_warm = [m for t, m in samples if t >= warm + 5] or [m for _, m in samples]
    half = len(after_warm) // 2
    memory = dict(samples_s_mib=samples, first_after_warmup_mib=after_warm[0], last_mib=after_warm[-1],
                  max_mib=max(after_warm),
                  first_half_mean_mib=round(float(np.mean(after_warm[:half or 1])), 1),
                  second_half_mean_mib=round(float(np.mean(after_warm[half:])), 1), cache_evictions=evictions)
    result = dict(
        model=ARCH, input_px=SIZE, torch_threads_server=1, client='asyncio + httpx, this process',
        machine=dict(cpus=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                     torch=torch.__version__, loadavg_before=[round(x, 2) for x in load0],
                     loadavg_after=[round(x, 2) for x in os.getloadavg()]),
        seconds_per_setting=secs, warmup_s=warm, quick=args.quick,
        rows=rows, mean_batch_size_batched_server=round(images_batched / max(batches, 1), 2),
        per_task_servers=dict(count=per_task_n, rss_mib_each_median=round(float(np.median(rss_each)), 1)),
        one_server_rss_mib=samples[0][1] if samples else None,
        memory_long_run=memory, wrong_answers_total=sum(r['wrong'] for r in rows),
        wall_s=round(time.time() - t_all, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + '\n')
    print('\n| setting | tasks | clients | answers/s | p50 ms | p99 ms | wrong |\n|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['setting']} | {r['tasks']} | {r['clients']} | {r['throughput']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['wrong']} |")
    print(f"\nmemory (long run): {memory['first_after_warmup_mib']} -> {memory['last_mib']} MiB "
          f"(max {memory['max_mib']}), {int(evictions)} cache evictions; wall {result['wall_s']} s; wrote {out}")
    return 0 if result['wrong_answers_total'] == 0 else 1


if __name__ == '__main__':
    sys.exit(main())

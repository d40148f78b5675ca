"""Scaling of one task's training over 2 CPU processes (DistributedDataParallel, gloo), measured in one run.

    python benchmarks/distributed.py            # ~2 minutes on 2 cores
    python benchmarks/distributed.py --quick    # smoke run

Two processes (1 torch thread each) join a gloo process group and alternate, block by block, between:

* ``single``: rank 0 trains alone on its batch (the plain modcl training step of ``train_task``), rank 1 waits at a
  barrier (its core stays idle): the 1-process baseline;
* ``ddp``: both train the same task through ``timm_modcl.distributed.wrap_ddp`` (what ``train_task`` uses under
  torchrun), each on its own batch of the same size (the global batch doubles);
* ``ddp_no_sync``: the same steps inside ``DDP.no_sync()`` (no gradient all-reduce): the compute-only time.

Interleaving the blocks spreads other load on the machine over all three alike. Reported (medians over blocks, with
min-max): steps/s and images/s of 1 and 2 processes, the scaling efficiency (images/s of 2 processes / (2 x images/s
of 1)), the communication share of a DDP step ((ddp - ddp_no_sync) / ddp: the all-reduce time the step waits for), and
the time each gradient all-reduce is in flight (a DDP communication hook around torch's ``allreduce_hook``), and how
much slower the step computes when both processes run (``ddp_no_sync`` / ``single``: ~1 on free cores, more when the
processes compete for cores or memory bandwidth).
Writes ``benchmarks/results/distributed.json``.
"""
import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / 'results'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args, out_file: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import timm
    import timm_modcl  # noqa: F401
    from timm.optim import create_optimizer_v2
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from timm_modcl.distributed import wrap_ddp

    dist.init_process_group('gloo')
    torch.manual_seed(0)
    model = timm.create_model(args.model)
    model.add_task('t', 10)  # the default task configuration
    model.train()
    device = torch.device('cpu')
    net = wrap_ddp(model, device)
    inflight = []

    def timed_allreduce(state, bucket):
        t0 = time.perf_counter()
        fut = default_hooks.allreduce_hook(state, bucket)

        def done(f):
            inflight.append(time.perf_counter() - t0)
            return f.value()[0] if isinstance(f.value(), list) else f.value()
        return fut.then(done)
    net.register_comm_hook(None, timed_allreduce)

    opt = create_optimizer_v2(model.parameters(), opt='adam', lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def step(m):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def block(mode: str) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        if mode == 'single':
            if rank == 0:
                for _ in range(args.steps):
                    step(model)
        elif mode == 'ddp':
            for _ in range(args.steps):
                step(net)
        else:
            with net.no_sync():
                for _ in range(args.steps):
                    step(net)
        elapsed = time.perf_counter() - t0
        dist.barrier()
        return elapsed

    for mode in ('single', 'ddp', 'ddp_no_sync'):  # warm-up
        block(mode)
    times = {'single': [], 'ddp': [], 'ddp_no_sync': []}
    inflight_per_step = []
    for _ in range(args.blocks):
        for mode in times:
            n0 = len(inflight)
            times[mode].append(block(mode) / args.steps)
            if mode == 'ddp':
                inflight_per_step.append(sum(inflight[n0:]) / args.steps)
    if rank == 0:
        Path(out_file).write_text(json.dumps({
            'step_s': times, 'allreduce_inflight_s': inflight_per_step,
            'allreduce_values': sum(p.numel() for p in model.parameters() if p.requires_grad),
            'buckets_per_step': len(inflight) / max(1, args.steps * (args.blocks + 1)),
        }))
    dist.destroy_process_group()


def _stats(values):
    return {'median': statistics.median(values), 'min': min(values), 'max': max(values), 'n': len(values)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='modcl_mobilenetv2_100')
    p.add_argument('--size', type=int, default=96, help='input size (default: 96)')
    p.add_argument('--batch', type=int, default=16, help='batch per process (default: 16)')
    p.add_argument('--steps', type=int, default=8, help='steps per block (default: 8)')
    p.add_argument('--blocks', type=int, default=7, help='blocks of each kind (default: 7)')
    p.add_argument('--quick', action='store_true', help='tiny run: 32 px, batch 4, 2 steps x 2 blocks')
    p.add_argument('--out', default=str(RESULTS / 'distributed.json'))
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.steps, args.blocks = 32, 4, 2, 2
    with tempfile.TemporaryDirectory() as tmp:
        raw_file = os.path.join(tmp, 'raw.json')
        load_before = os.getloadavg()
        torch.multiprocessing.spawn(_worker, args=(2, _free_port(), args, raw_file), nprocs=2, join=True)
        load_after = os.getloadavg()
        raw = json.loads(Path(raw_file).read_text())

    t = raw['step_s']
    single, ddp, nosync = t['single'], t['ddp'], t['ddp_no_sync']
    efficiency = [s / d for s, d in zip(single, ddp)]            # per interleaved block
    comm_share = [(d - n) / d for d, n in zip(ddp, nosync)]
    inflight_share = [a / d for a, d in zip(raw['allreduce_inflight_s'], ddp)]
    # how much slower the same step computes when both processes run (no communication): on a machine whose cores
    # are free this is ~1; above 1 the processes compete for cores or memory bandwidth (e.g. a shared machine)
    slowdown = [n / s for n, s in zip(nosync, single)]
    result = {
        'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(), 'torch_threads_per_process': 1,
                    'torch': torch.__version__, 'loadavg_1min_before_after': [load_before[0], load_after[0]]},
        'config': {'model': args.model, 'input_size': args.size, 'batch_per_process': args.batch,
                   'steps_per_block': args.steps, 'blocks': args.blocks, 'backend': 'gloo',
                   'allreduce_values_per_step': raw['allreduce_values'],
                   'allreduce_buckets_per_step': raw['buckets_per_step']},
        'steps_per_s': {'1_process': _stats([1 / s for s in single]), '2_processes': _stats([1 / s for s in ddp])},
        'images_per_s': {'1_process': _stats([args.batch / s for s in single]),
                         '2_processes': _stats([2 * args.batch / s for s in ddp])},
        'scaling_efficiency': _stats(efficiency),
        'comm_share_of_ddp_step': _stats(comm_share),
        'allreduce_inflight_share_of_ddp_step': _stats(inflight_share),
        'compute_slowdown_with_2_processes': _stats(slowdown),
        'efficiency_bound_by_communication': _stats([1 - c for c in comm_share]),
        'step_s': {k: _stats(v) for k, v in t.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + '\n')
    s1, s2 = result['images_per_s']['1_process'], result['images_per_s']['2_processes']
    e, c = result['scaling_efficiency'], result['comm_share_of_ddp_step']
    f = result['allreduce_inflight_share_of_ddp_step']
    print(f'{args.model}, {args.size}px, batch {args.batch} per process, gloo, 1 thread per process '
          f'(load {load_before[0]:.1f} -> {load_after[0]:.1f}); medians [min-max] over {args.blocks} blocks')
    print(f'1 process:   {1 / statistics.median(single):6.2f} steps/s  {s1["median"]:7.1f} images/s '
          f'[{s1["min"]:.1f}-{s1["max"]:.1f}]')
    print(f'2 processes: {1 / statistics.median(ddp):6.2f} steps/s  {s2["median"]:7.1f} images/s '
          f'[{s2["min"]:.1f}-{s2["max"]:.1f}]')
    print(f'scaling efficiency: {e["median"]:.2f} [{e["min"]:.2f}-{e["max"]:.2f}]   '
          f'communication share of a DDP step: {100 * c["median"]:.1f}% [{100 * c["min"]:.1f}-{100 * c["max"]:.1f}] '
          f'(all-reduce in flight: {100 * f["median"]:.1f}% of the step, '
          f'{raw["allreduce_values"]:,} values)')
    sl = result['compute_slowdown_with_2_processes']
    print(f'the same step without communication computes {sl["median"]:.2f}x slower with 2 processes than with 1 '
          f'[{sl["min"]:.2f}-{sl["max"]:.2f}]: efficiency = (1 - communication share) / that slowdown')
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

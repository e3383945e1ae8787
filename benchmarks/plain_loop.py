"""The loop a user would write by hand: ImageFolder + DataLoader + model + AdamW + cross-entropy.

The baseline the tool's epoch time is measured against. Nothing here comes from finetune_cli.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T


def train_transform(size: int, scale_min: float = 0.35) -> T.Compose:
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])


def plain_train(root: Path, model_name: str, *, size: int, batch_size: int, epochs: int, workers: int,
                lr: float = 1e-4, device: str = "cpu") -> List[float]:
    """Train every parameter; returns the seconds of each training epoch."""
    data = torchvision.datasets.ImageFolder(str(root / "train"), transform=train_transform(size))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device == "cuda")
    model = torchvision.models.get_model(model_name, num_classes=len(data.classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    seconds = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds

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


def eval_transform(size: int) -> T.Compose:
    """torchvision's classification preset at ``size``: resize to 256/224 of it, centre crop."""
    return T.Compose([
        T.ToImage(),
        T.Resize(int(round(size * 256 / 224)), antialias=True),
        T.CenterCrop(size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])


def plain_finetune(root: Path, model_name: str, weights: Path, *, size: int, batch_size: int, epochs: int,
                   seed: int, lr: float = 1e-3, cosine: bool = False, workers: int = 0) -> dict:
    """Full fine-tuning as written by hand: pretrained weights from a state-dict file (its head
    left out), a new head, AdamW at ``lr`` with its default weight decay, a constant LR (or
    cosine annealing over the epochs, stepped per epoch),
    random-resized-crop + flip, every BatchNorm in train mode; validation after every epoch.

    Returns ``{"val_acc": [per epoch], "seconds": [training seconds per epoch]}``."""
    torch.manual_seed(seed)
    data = torchvision.datasets.ImageFolder(str(root / "train"), transform=train_transform(size))
    val = torchvision.datasets.ImageFolder(str(root / "val"), transform=eval_transform(size))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers)
    val_loader = DataLoader(val, batch_size=batch_size, num_workers=workers)
    model = torchvision.models.get_model(model_name, num_classes=len(data.classes))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    head = {k for k in model.state_dict() if k.startswith("fc.")}
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    assert set(missing) == head and not unexpected, (missing, unexpected)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs) if cosine else None
    criterion = nn.CrossEntropyLoss()
    accs, seconds = [], []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for images, targets in loader:
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
        if schedule is not None:
            schedule.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, targets in val_loader:
                correct += (model(images).argmax(1) == targets).sum().item()
        accs.append(correct / len(val))
    return {"val_acc": accs, "seconds": seconds}

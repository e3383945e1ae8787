"""The most a linear probe can reach on the synthetic task: a logistic regression on the frozen
pretrained features, solved to convergence (L-BFGS), for several weight decays, on raw and on
standardised features, against the validation images.

The features are those ``strategy=linear_probe`` trains on: resnet18 from the synthetic source
task's weights, BatchNorm statistics as pretrained, the validation transform (resize, centre crop)
on the training images too (no augmentation). No epoch budget applies, so the best row bounds what
any recipe that trains the head alone can get at equal data: compare it with the plain loop's best
validation accuracy in ``bench_recipes.py``.

    python benchmarks/bench_probe_ceiling.py
"""

from __future__ import annotations

import torch
import torchvision
from common import machine, parser, synthetic_folder, table
from plain_loop import eval_transform
from torch.nn import functional as F

from finetune_cli.models.pretrain import synthetic_weights
from finetune_cli.paths import cache_dir
from finetune_cli.train.engine import Precision


def features(model: torch.nn.Module, folder, size: int):
    data = torchvision.datasets.ImageFolder(str(folder), transform=eval_transform(size))
    xs, ys = [], []
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(data, batch_size=100):
            xs.append(model(x))
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def solve(x, y, classes: int, decay: float, iterations: int) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--per-class", type=int, default=60, help="training images per class")
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()
    classes, per_class, val, size, iterations = 10, a.per_class, 20, a.size, 500
    if a.quick:
        per_class, val, size, iterations = 4, 2, 32, 5
    root = synthetic_folder(classes, per_class, val, size)
    weights = synthetic_weights("resnet18", cache_dir(None), torch.device("cpu"), Precision(None), 0, False)
    model = torchvision.models.get_model("resnet18", num_classes=classes)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
    model.fc = torch.nn.Identity()
    model.eval()
    print(f"{machine()}\nsynthetic target task: {classes} classes x {per_class} training images, {size} px; "
          f"resnet18 from the synthetic source task's weights, frozen")
    train_x, train_y = features(model, root / "train", size)
    val_x, val_y = features(model, root / "val", size)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    rows, best = [], 0.0
    for standardised in (False, True):
        a_x, v_x = ((train_x - mean) / std, (val_x - mean) / std) if standardised else (train_x, val_x)
        for decay in (0.0, 1e-4, 1e-3, 1e-2, 1e-1):
            head = solve(a_x, train_y, classes, decay, iterations)
            with torch.no_grad():
                fit = (head(a_x).argmax(1) == train_y).float().mean().item()
                acc = (head(v_x).argmax(1) == val_y).float().mean().item()
            best = max(best, acc)
            rows.append(["yes" if standardised else "no", decay, f"{fit:.1%}", f"{acc:.1%}"])
    print(table(["standardised", "weight decay", "train acc", "val acc"], rows))
    print(f"linear probe ceiling (best val acc): {best:.1%}")


if __name__ == "__main__":
    main()

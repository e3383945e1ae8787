"""Frozen layers are free: training-epoch time and gradient + optimizer memory per strategy.

For each model: full fine-tuning, freeze_early with every group but the last stage frozen, and a
linear probe without the feature cache (so its epochs still run the frozen network), all through
finetune-cli on the same generated 64 px folder, in one process. Prints epoch-time ratios against
full fine-tuning and the gradient + optimizer-state memory from each run's summary.json.

    python benchmarks/bench_freezing.py   # targets: linear_probe <= 0.45 x full, freeze_early <= 0.75 x full
"""

from __future__ import annotations

from common import machine, median_after_first, parser, synthetic_folder, table, tool_run, workdir

STRATEGIES = {
    "full": ["strategy=full"],
    "freeze_early": ["strategy=freeze_early", "strategy.freeze_groups=4"],  # stem + layer1-3 frozen
    "linear_probe": ["strategy=linear_probe", "data.cache_features=false"],
}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=32)
    a = p.parse_args()
    if a.quick:
        a.models, a.size, a.epochs, a.classes, a.per_class, a.batch = "resnet18", 32, 2, 2, 8, 8
    root = synthetic_folder(a.classes, a.per_class, 4, a.size)
    out = workdir(a.workdir)
    print(f"{machine()}\n{a.size} px, batch {a.batch}, {a.classes * a.per_class} training images, {a.epochs} epochs")
    for model in a.models.split(","):
        results = {}
        for name, overrides in STRATEGIES.items():
            summary, rows = tool_run([
                f"data.root={root}", f"model.name={model}", "model.weights=null", *overrides,
                f"data.image_size={a.size}", f"data.batch_size={a.batch}", f"trainer.epochs={a.epochs}",
            ], out / f"{model}-{name}")
            results[name] = (median_after_first(float(r["train_seconds"]) for r in rows), summary)
        full_s, full = results["full"]
        lines = []
        for name, (seconds, s) in results.items():
            lines.append([name, f"{s['trainable_pct']:.1f}%", f"{seconds:.2f}", f"{seconds / full_s:.2f}",
                          f"{s['memory_mb']['grads']:.1f}", f"{s['memory_mb']['optimizer_state']:.1f}",
                          f"{full['grad_optimizer_mb'] / s['grad_optimizer_mb']:,.1f}x less" if name != "full" else "-"])
        print(f"\n{model}")
        print(table(["strategy", "trainable", "s/epoch", "x full", "grads MB", "optimizer MB", "grad+opt vs full"],
                    lines))
        lp, fe = results["linear_probe"][0] / full_s, results["freeze_early"][0] / full_s
        print(f"{model}: linear_probe = {lp:.2f} x full (target <= 0.45), freeze_early = {fe:.2f} x full (target <= 0.75)")


if __name__ == "__main__":
    main()

"""Cached features for probes: 20 epochs of linear probing with and without data.cache_features.

Both runs start from the same pretrained weights (the tool's synthetic pretraining, computed once
and cached) on the same generated data with augment=none, in one process. Prints the time of the
epochs (plus, for the cached run, the one-off feature extraction), the speed-up and both best
validation accuracies.

    python benchmarks/bench_cache.py   # targets: >= 10x faster, best val accuracy within 1 point
"""

from __future__ import annotations

from common import machine, parser, table, tool_run, workdir


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args()
    data = ["data=synthetic", f"data.synthetic.image_size={a.size}"]
    if a.quick:
        a.epochs = 2
        data += ["data.synthetic.classes=3", "data.synthetic.train_per_class=8", "data.synthetic.val_per_class=4"]
    weights = "model.weights=null" if a.quick else "model.weights=synthetic"
    out = workdir(a.workdir)
    print(f"{machine()}\n{a.model}, {a.size} px, linear probe, {a.epochs} epochs, augment=none")
    results = {}
    for name, switch in (("no cache", "false"), ("cache", "true")):
        summary, rows = tool_run([
            *data, f"model.name={a.model}", weights, "strategy=linear_probe", "augment=none",
            f"trainer.epochs={a.epochs}", f"data.cache_features={switch}", "optimizer.lr=0.01",
        ], out / name.replace(" ", "-"))
        epochs = sum(float(r["epoch_seconds"]) for r in rows)
        extract = summary["feature_cache"]["seconds"]
        results[name] = (epochs + extract, extract, summary["best"]["value"], summary["feature_cache"])
    plain, cached = results["no cache"], results["cache"]
    print(table(["", "seconds (epochs + extraction)", "extraction s", "best val acc"],
                [[k, f"{v[0]:.2f}", f"{v[1]:.2f}", f"{100 * v[2]:.1f}%"] for k, v in results.items()]))
    print(f"feature cache: {cached[3]['shape']} per image, {cached[3]['mb']:.2f} MB")
    print(f"speed-up: {plain[0] / cached[0]:.1f}x (target >= 10); best val acc difference: "
          f"{100 * abs(plain[2] - cached[2]):.2f} points (target <= 1)")


if __name__ == "__main__":
    main()

"""``finetune-cli-export CHECKPOINT``: ONNX and ``torch.export`` files, verified, with a model card.

Writes ``model.onnx`` (dynamic batch axis; input ``images`` NCHW float32, output ``logits``),
``model.pt2`` (``torch.export``, dynamic batch) and ``model_card.json`` (classes, input size,
normalization, source run, export checks). ``model.onnx`` is one self-contained file, weights
included; only a model too large for that (about 1.5 GB of weights and more) keeps its weights in
``model.onnx.data`` beside it, and both files are then named and must be copied together. Each
export is run on a sample batch of a different size than the one traced and compared with
PyTorch: the largest absolute difference is printed and must stay within ``--tolerance``. ONNX needs the ``export`` extra
(``pip install 'finetune-cli[export]'``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from finetune_cli.errors import FinetuneError
from finetune_cli.io_utils import atomic_json
from finetune_cli.tools.loading import Loaded, load_for_inference, run_dir_of, tool_main, tool_parser

DEFAULT_OPSET = 18
EXTRA_HINT = "pip install 'finetune-cli[export]' (onnx, onnxscript, onnxruntime)"


def _sample(loaded: Loaded, batch: int, seed: int) -> torch.Tensor:
    size = loaded.preprocess.crop_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check(name: str, diff: float, tolerance: float) -> None:
    print(f"{name}: max abs difference from PyTorch {diff:.3e} (tolerance {tolerance:g})")
    if not diff <= tolerance:
        raise FinetuneError(
            f"The {name} export differs from PyTorch by {diff:.3e}, more than --tolerance {tolerance:g}; the file "
            "was written but should not be trusted. Try another --opset, or report the model name."
        )


def _external_files(path: Path) -> List[str]:
    """The files (relative to ``path``'s folder) an ONNX model keeps its weights in, besides itself."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    found: List[str] = []
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location and location not in found:
                found.append(location)
    return found


def export_onnx(loaded: Loaded, path: Path, opset: int, tolerance: float) -> Dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise FinetuneError(f"ONNX export needs onnxruntime to verify the file: {EXTRA_HINT}.") from None
    # weights beside the model from an earlier export would be stale, or stray next to a single file
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                loaded.model, (_sample(loaded, 2, 0),), str(path), dynamo=True, opset_version=opset,
                input_names=["images"], output_names=["logits"], dynamic_shapes=({0: batch},),
                external_data=False,  # the exporter still writes model.onnx.data for a model too large for one file
            )
    except ImportError as exc:
        raise FinetuneError(f"ONNX export needs {exc.name or 'onnx and onnxscript'}: {EXTRA_HINT}.") from None
    external = _external_files(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _sample(loaded, 3, 1)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.inference_mode():
        want = loaded.model(x)
    diff = float((got - want).abs().max())
    _check("ONNX (onnxruntime)", diff, tolerance)
    info: Dict[str, Any] = {"file": path.name, "opset": opset, "max_abs_diff": diff, "verified_batch": 3,
                            "dynamic_axes": {"images": [0]}}
    if external:
        info["external_data"] = external
        info["note"] = (f"the weights are in {', '.join(external)}, which must stay in the same folder as "
                        f"{path.name} (a model this large cannot be one ONNX file)")
    return info


def export_program(loaded: Loaded, path: Path, tolerance: float) -> Dict[str, Any]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(loaded.model, (_sample(loaded, 2, 0),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    x = _sample(loaded, 3, 1)
    with torch.inference_mode():
        got = torch.export.load(str(path)).module()(x)
        want = loaded.model(x)
    diff = float((got - want).abs().max())
    _check("torch.export", diff, tolerance)
    return {"file": path.name, "max_abs_diff": diff, "verified_batch": 3}


def export(checkpoint: str, out: Path, *, opset: int, tolerance: float, onnx: bool = True, program: bool = True) -> Dict[str, Any]:
    loaded = load_for_inference(checkpoint, torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    pre = loaded.preprocess
    card: Dict[str, Any] = {
        "model": loaded.model_name,
        "classes": loaded.classes,
        "num_classes": len(loaded.classes),
        "input": {"name": "images", "shape": ["batch", 3, pre.crop_size, pre.crop_size], "dtype": "float32",
                  "layout": "NCHW", "value_range": "normalized"},
        "output": {"name": "logits", "shape": ["batch", len(loaded.classes)], "note": "apply softmax for probabilities"},
        "preprocessing": {
            "resize": pre.resize_size, "center_crop": pre.crop_size, "interpolation": pre.interpolation,
            "mean": list(pre.mean), "std": list(pre.std),
            "steps": "RGB image -> resize shorter side -> centre crop -> scale to [0, 1] -> (x - mean) / std",
        },
        "source": {"checkpoint": str(loaded.path), "run": str(loaded.run_dir) if loaded.run_dir else None,
                   "epoch": loaded.epoch, "metrics": loaded.metrics},
    }
    if onnx:
        card["onnx"] = export_onnx(loaded, out / "model.onnx", opset, tolerance)
    if program:
        card["torch_export"] = export_program(loaded, out / "model.pt2", tolerance)
    atomic_json(card, out / "model_card.json")
    return card


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    parser = tool_parser("finetune-cli-export", __doc__)
    parser.add_argument("--out-dir", type=Path, help="default: RUN/export (or ./export)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (default 1e-4)")
    parser.add_argument("--no-onnx", action="store_true", help="only the torch.export file")
    parser.add_argument("--no-pt2", action="store_true", help="only the ONNX file")
    args = parser.parse_args(argv)
    out = args.out_dir
    if out is None:
        from finetune_cli.train.checkpoint import resolve_checkpoint

        out = (run_dir_of(resolve_checkpoint(args.checkpoint)) or Path.cwd()) / "export"
    card = export(args.checkpoint, out, opset=args.opset, tolerance=args.tolerance, onnx=not args.no_onnx,
                  program=not args.no_pt2)
    files = [card[k]["file"] for k in ("onnx", "torch_export") if k in card] + ["model_card.json"]
    external = card.get("onnx", {}).get("external_data", [])
    files[1:1] = external
    print(f"Wrote {', '.join(str(out / f) for f in files)}")
    if external:
        print(f"{card['onnx']['file']} keeps its weights in {', '.join(external)}: copy them together.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

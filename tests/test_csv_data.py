"""data=csv: images listed in a CSV file of path,label[,split] rows."""

import pytest
from PIL import Image

from finetune_cli.errors import FinetuneError

from helpers import assert_same_runs, cli, make_image_folder

BASE = ["debug=tiny", "data=csv", "strategy=full", "trainer.epochs=2"]


def _rows(root, splits=("train", "val")):
    """``(relative path, label, split)`` for every image of a make_image_folder layout."""
    return [(str(p.relative_to(root)), p.parent.name, split)
            for split in splits for p in sorted((root / split).rglob("*.png"))]


def _write(path, rows, header=None):
    lines = ([",".join(header)] if header else []) + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_csv_with_a_split_column_trains_exactly_as_the_same_images_in_folders(finetune, tmp_path):
    root = make_image_folder(tmp_path / "images", classes=("cat", "dog", "fox"), per_class=6)
    listing = _write(root / "labels.csv", _rows(root), header=("image", "label", "split"))
    summary, from_csv = finetune(*BASE, f"data.csv={listing}", name="csv")
    _, from_folders = finetune(*BASE, "data=imagefolder", f"data.root={root}", name="folders")
    assert summary["dataset"]["root"] == str(listing) and summary["dataset"]["train_images"] == 18
    assert summary["dataset"]["class_counts"]["val"] == {"cat": 6, "dog": 6, "fox": 6}
    assert_same_runs(from_csv, from_folders, ("train_loss", "val_acc"))


def test_header_less_rows_start_at_data_root_and_validation_is_split_off(finetune, tmp_path, caplog):
    root = make_image_folder(tmp_path / "images", per_class=10, val=False)
    rows = [(path, label) for path, label, _ in _rows(root, ("train",))]
    listing = _write(tmp_path / "elsewhere.csv", rows)
    summary, _ = finetune(*BASE, f"data.csv={listing}", f"data.root={root}", "data.val_fraction=0.2")
    assert summary["dataset"]["train_images"] == 16 and summary["dataset"]["val_images"] == 4
    assert "stratified split of the CSV's train rows (val_fraction=0.2" in caplog.text


def test_test_rows_are_left_out_and_counted(finetune, tmp_path, caplog):
    root = make_image_folder(tmp_path / "images", per_class=6)
    rows = _rows(root)
    rows = [(p, c, "test" if s == "val" and p.endswith(("0.png", "1.png")) else s) for p, c, s in rows]
    summary, _ = finetune(*BASE, f"data.csv={_write(root / 'l.csv', rows)}")
    assert summary["dataset"]["val_images"] == 8 and "the CSV's val rows; 4 test rows left out" in caplog.text


@pytest.mark.bad_input
@pytest.mark.parametrize("case, needle", [
    ("missing", "1 listed files do not exist (relative paths start at the CSV's folder"),
    ("twice", "1 images are listed more than once"),
    ("split", "1 rows have a split other than train, val or test"),
    ("one_class", "the train rows have 1 label (cat)"),
    ("only_val", "labels only in val rows, never trained on: fox"),
    ("header", "names no label column"),
    ("short", "1 rows have fewer than 2 columns"),
])
def test_bad_rows_are_refused_naming_the_lines_and_the_remedy(finetune, tmp_path, case, needle):
    root = make_image_folder(tmp_path / "images", per_class=4)
    rows = [(p, c) for p, c, s in _rows(root, ("train",))]
    header = None
    if case == "missing":
        rows.append(("train/cat/nine.png", "cat"))
    elif case == "twice":
        rows.append((rows[0][0], "dog"))
    elif case == "split":
        rows = [(p, c, "train") for p, c in rows] + [(rows[0][0].replace("train", "val"), "cat", "holdout")]
    elif case == "one_class":
        rows = [r for r in rows if r[1] == "cat"]
    elif case == "only_val":
        fox = tmp_path / "images" / "val" / "fox"
        fox.mkdir()
        Image.new("RGB", (8, 8)).save(fox / "0.png")
        rows = [(p, c, "train") for p, c in rows] + [("val/fox/0.png", "fox", "val")]
    elif case == "header":
        header = ("path", "kind")
    elif case == "short":
        rows.append((rows[0][0],))
    listing = _write(root / "labels.csv", rows, header)
    with pytest.raises(FinetuneError, match="Nothing was trained|classifier needs|never trained|header row") as err:
        finetune(*BASE, f"data.csv={listing}")
    assert needle in str(err.value)


@pytest.mark.bad_input
def test_the_cli_refuses_a_missing_csv_before_anything_runs(tmp_path):
    """(Bad rows are refused by the same path: in-process above.)"""
    proc = cli(["debug=tiny", "data=csv"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "data=csv needs data.csv=FILE" in proc.stderr and not (tmp_path / "outputs").exists()


@pytest.mark.bad_input
def test_a_bad_listed_image_is_checked_like_a_folder_image(finetune, tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=6)
    (root / "train" / "cat" / "0.png").write_bytes(b"not a png")
    listing = _write(root / "labels.csv", _rows(root), header=("path", "label", "split"))
    with pytest.raises(FinetuneError, match="1 of 24 images under .*labels.csv cannot be used"):
        finetune(*BASE, f"data.csv={listing}")
    summary, run = finetune(*BASE, f"data.csv={listing}", "data.on_bad_image=skip")
    assert summary["dataset"]["train_images"] == 11 and "0.png" in (run / "skipped_images.txt").read_text()

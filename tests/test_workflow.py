"""The classification workflow on image folders: vit_fast.data, train, evaluate, predict.

Runs on the CPU with vit_tiny_patch16_224 at 64 px cut to 2 blocks, on 3 classes of generated
64x64 pictures (a coloured shape on noise) saved in every accepted extension, a corrupt file
among them. The model runs its PyTorch path here (VIT_FAST_FORCE_TORCH=1): conftest turns on
Triton's interpreter, which would run every kernel of every step at interpreter speed; the
kernels themselves are proven by the op and model tests.
"""
import contextlib
import csv
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import vit_fast
from vit_fast import data, dispatch, evaluate, predict, run_files, train
from vit_fast.dispatch import FORCE_TORCH_ENV
from workflow_helpers import torch_path  # noqa: F401  (autouse: the PyTorch path)

# drop path makes the resume test cover the per-epoch seeding of the model's randomness
MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "64", "--model-arg", "depth=2",
         "--model-arg", "drop_path_rate=0.1"]
TRAIN_ARGS = [*MODEL, "--batch-size", "8", "--lr", "1e-3", "--warmup-epochs", "0.5", "--seed", "3"]
COLOURS = {"blue_triangle": (40, 60, 220), "green_square": (40, 190, 60), "red_circle": (220, 40, 40)}
EXTENSIONS = [".png", ".JPG", ".jpeg", ".BMP", ".webp", ".Png", ".JPEG", ".PNG", ".Webp", ".bmp", ".jpg"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 12, 4


def picture(name, rng):
    img = Image.fromarray(rng.integers(90, 166, (64, 64, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    s = int(rng.integers(20, 40))
    x, y = (int(v) for v in rng.integers(2, 62 - s, 2))
    if name.endswith("circle"):
        draw.ellipse([x, y, x + s, y + s], fill=COLOURS[name])
    elif name.endswith("square"):
        draw.rectangle([x, y, x + s, y + s], fill=COLOURS[name])
    else:
        draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=COLOURS[name])
    return img


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("DATA")
    rng = np.random.default_rng(0)
    k = 0
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for name in COLOURS:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                picture(name, rng).save(root / split / name / f"{i}{EXTENSIONS[k % len(EXTENSIONS)]}")
                k += 1
    (root / "train" / "red_circle" / "corrupt.jpg").write_bytes(b"not a JPEG at all")
    (root / "train" / "red_circle" / "notes.txt").write_text("not an image extension: ignored")
    return root


def run_train(argv):
    """train.main in this process; returns (stdout, the warning lines logged by vit_fast.data)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vit_fast.data").addHandler(handler)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            train.main([str(a) for a in argv])
    finally:
        logging.getLogger("vit_fast.data").removeHandler(handler)
    return out.getvalue(), [r.getMessage() for r in records if r.levelno == logging.WARNING]


def read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, epochs):
    """Stop train.main once ``epochs`` epochs have written their files, as a killed run would."""
    written = []
    plot = run_files.plot_curves

    def plot_then_maybe_stop(*args):
        plot(*args)
        written.append(1)
        if len(written) == epochs:
            raise Interrupted

    monkeypatch.setattr(run_files, "plot_curves", plot_then_maybe_stop)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """One uninterrupted 4-epoch run, decoding in 2 worker processes."""
    run = tmp_path_factory.mktemp("run")
    stdout, warnings = run_train(["--data", dataset, *TRAIN_ARGS, "--epochs", "4", "--workers", "2", "--out", run])
    return run, stdout, warnings


# ----------------------------------------------------------------------------- train


def test_training_learns_and_writes_the_run_folder(trained):
    run, stdout, _ = trained
    rows = read_metrics(run / "metrics.csv")
    with open(run / "metrics.csv") as f:
        assert f.readline().strip() == "epoch,train_loss,train_top1,val_loss,val_top1,val_top5,lr,images_per_s"
    print(stdout)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["val_top1"]) >= 0.9  # chance: 1/3
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # cosine decay
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    last = torch.load(run / "last.pt")
    assert last["epoch"] == 4 and last["scaler"] is None
    assert last["classes"] == sorted(COLOURS) and last["model_name"] == "vit_tiny_patch16_224"
    assert last["model_kwargs"] == {"depth": 2, "drop_path_rate": 0.1} and last["img_size"] == 64
    assert last["args"]["lr"] == 1e-3
    assert {"model", "optimizer", "scheduler"} <= set(last)
    best = torch.load(run / "best.pt")
    assert best["val_top1"] == max(float(r["val_top1"]) for r in rows)


def test_corrupt_image_is_skipped_named_once_and_counted_each_epoch(trained):
    _, stdout, warnings = trained
    corrupt = [w for w in warnings if "corrupt.jpg" in w]
    assert len(corrupt) == 1 and "skipped unreadable image" in corrupt[0]  # once per run, not per epoch
    summaries = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert len(summaries) == 4
    expected_images = 3 * TRAIN_PER_CLASS
    assert all(f"({expected_images} images)" in s and "skipped unreadable images: 1 train, 0 val" in s
               for s in summaries)


def test_resume_continues_and_matches_the_uninterrupted_run(trained, dataset, tmp_path, monkeypatch):
    uninterrupted, _, _ = trained
    run = tmp_path / "run"
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run_train(["--data", dataset, *TRAIN_ARGS, "--epochs", "4", "--workers", "2", "--out", run])
    assert len(read_metrics(run / "metrics.csv")) == 2
    monkeypatch.undo()

    # the other arguments come from the checkpoint; another worker count must not change the data
    stdout, _ = run_train(["--resume", run / "last.pt", "--workers", "0"])
    assert "epoch 1/4" not in stdout and "epoch 3/4" in stdout

    resumed, reference = read_metrics(run / "metrics.csv"), read_metrics(uninterrupted / "metrics.csv")
    assert len(resumed) == 4
    for a, b in zip(resumed, reference):
        a.pop("images_per_s"), b.pop("images_per_s")
        assert a == b
    final, expected = torch.load(run / "last.pt"), torch.load(uninterrupted / "last.pt")
    assert final["epoch"] == 4
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), key


def test_resume_with_another_model_is_refused(trained):
    run, _, _ = trained
    with pytest.raises(SystemExit, match="vit_tiny_patch16_224.*vit_small_patch16_224"):
        train.main(["--resume", str(run / "last.pt"), "--model", "vit_small_patch16_224"])
    with pytest.raises(SystemExit, match="--img-size 64.*--img-size 32"):
        train.main(["--resume", str(run / "last.pt"), "--img-size", "32"])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        train.main(["--resume", str(run / "missing.pt")])


def test_freeze_epochs_train_only_the_head_then_everything(dataset, tmp_path, monkeypatch):
    pretrained = tmp_path / "pretrained.pth"
    torch.manual_seed(1)
    torch.save(vit_fast.create_model("vit_tiny_patch16_224", num_classes=5, img_size=64, depth=2).state_dict(),
               pretrained)
    weights = torch.load(pretrained)
    run = tmp_path / "run"
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupted), pytest.warns(UserWarning, match="head"):  # 5 classes -> 3: new head
        run_train(["--data", dataset, *TRAIN_ARGS, "--weights", pretrained, "--epochs", "2",
                   "--freeze-epochs", "1", "--no-augment", "--workers", "0", "--out", run])
    monkeypatch.undo()

    frozen = torch.load(run / "last.pt")
    backbone = [k for k in weights if not k.startswith("head.")]
    assert all(torch.equal(frozen["model"][k], weights[k]) for k in backbone)  # bit-identical
    assert len(frozen["optimizer"]["state"]) == 2  # only head.weight and head.bias ever stepped

    stdout, _ = run_train(["--resume", run / "last.pt"])
    assert "head only" not in stdout
    unfrozen = torch.load(run / "last.pt")
    assert all(not torch.equal(unfrozen["model"][k], weights[k]) for k in backbone if k.endswith("weight"))
    assert not torch.equal(unfrozen["model"]["head.weight"], frozen["model"]["head.weight"])


def test_torchrun_two_processes_gloo(dataset, tmp_path):
    """Two DDP processes on the CPU; the head-only epoch then the full one (DDP rebuilt per phase);
    --dist-timeout reaches the process group."""
    run = tmp_path / "run"
    env = {**os.environ, FORCE_TORCH_ENV: "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "vit_fast.train",
           "--data", str(dataset), *TRAIN_ARGS, "--epochs", "2", "--freeze-epochs", "1", "--workers", "1",
           "--device", "cpu", "--dist-timeout", "2m", "--out", str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es) on cpu (collective timeout 120 s)" in proc.stdout
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(summaries) == 2 and "head only" in summaries[0] and "head only" not in summaries[1]
    for summary in summaries:
        # counts are summed over both processes: 37 files, padded to 38 by the distributed sampler
        seen = int(summary.split("(")[1].split(" images")[0])
        skipped = int(summary.split("skipped unreadable images: ")[1].split(" train")[0])
        assert seen + skipped == 38 and skipped >= 1
    assert len(read_metrics(run / "metrics.csv")) == 2  # rank 0 alone writes
    assert torch.load(run / "last.pt")["epoch"] == 2


@pytest.mark.gpu
def test_gpu_run_with_amp_on_the_kernels(dataset, tmp_path, monkeypatch):
    """On a GPU: bf16 autocast, fused AdamW, pinned uint8 batches into the fused ops, then evaluate."""
    monkeypatch.delenv(FORCE_TORCH_ENV)
    launches = sum(dispatch.kernel_launches.values())
    run = tmp_path / "run"
    run_train(["--data", dataset, *TRAIN_ARGS, "--epochs", "4", "--amp", "--device", "cuda", "--workers", "2",
               "--out", run])
    assert sum(dispatch.kernel_launches.values()) > launches
    assert float(read_metrics(run / "metrics.csv")[-1]["val_top1"]) >= 0.9
    report = tmp_path / "eval.json"
    assert evaluate.main(["--weights", str(run / "best.pt"), "--data", str(dataset / "val"), "--amp",
                          "--device", "cuda", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["top1"] >= 0.9


# ----------------------------------------------------------------------------- evaluate and predict


def test_evaluate_agrees_with_predict(trained, dataset, tmp_path, capsys):
    run, _, _ = trained
    report, plot, preds = tmp_path / "eval.json", tmp_path / "confusion.png", tmp_path / "pred.json"
    assert evaluate.main(["--weights", str(run / "best.pt"), "--data", str(dataset / "val"), "--json", str(report),
                          "--plot", str(plot), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-3" in printed and "confusion matrix" in printed
    assert predict.main(["--weights", str(run / "best.pt"), str(dataset / "val"), "--topk", "3",
                         "--json", str(preds)]) == 0

    result, predictions = json.loads(report.read_text()), json.loads(preds.read_text())
    assert set(result) == {"top1", "top5", "per_class", "confusion", "classes"}
    classes = result["classes"]
    assert classes == sorted(COLOURS)
    assert len(predictions) == 3 * VAL_PER_CLASS
    confusion = [[0] * 3 for _ in classes]
    for p in predictions:
        assert set(p) == {"path", "topk"} and [set(t) for t in p["topk"]] == [{"class", "prob"}] * 3
        probs = [t["prob"] for t in p["topk"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
        true_class = os.path.basename(os.path.dirname(p["path"]))
        confusion[classes.index(true_class)][classes.index(p["topk"][0]["class"])] += 1
    assert result["confusion"] == confusion
    assert result["top1"] == pytest.approx(sum(confusion[i][i] for i in range(3)) / len(predictions))
    assert result["top5"] == 1.0  # top-3 of 3 classes
    for i, name in enumerate(classes):
        m = result["per_class"][name]
        assert m["support"] == VAL_PER_CLASS
        assert m["recall"] == pytest.approx(confusion[i][i] / VAL_PER_CLASS)
        predicted = sum(row[i] for row in confusion)
        assert m["precision"] == pytest.approx(confusion[i][i] / predicted if predicted else 0.0)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_predict_reports_unreadable_files_and_exits_nonzero(trained, dataset, tmp_path, capsys):
    run, _, _ = trained
    good = sorted((dataset / "val" / "green_square").iterdir())[:2]
    images = [good[0], dataset / "train" / "red_circle" / "corrupt.jpg", tmp_path / "missing.png", good[1]]
    assert predict.main(["--weights", str(run / "last.pt"), *map(str, images), "--topk", "2"]) == 1
    out, err = capsys.readouterr()
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(good[0]), str(good[1])]
    assert all(len(line.split(", ")) == 2 for line in out.splitlines())  # top-2
    assert f"error: {dataset / 'train' / 'red_circle' / 'corrupt.jpg'}: cannot read image" in err
    assert f"error: {tmp_path / 'missing.png'}: cannot read image" in err


def test_evaluate_and_predict_refuse_a_file_that_is_not_a_run_checkpoint(dataset, tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save({"model": {}}, plain)
    with pytest.raises(SystemExit, match="not a checkpoint written by vit_fast.train"):
        evaluate.main(["--weights", str(plain), "--data", str(dataset / "val")])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        predict.main(["--weights", str(tmp_path / "none.pt"), str(dataset)])


# ----------------------------------------------------------------------------- data


def test_every_extension_in_any_case_is_an_image_and_nothing_else(dataset):
    names = [p.name for p in data.list_images(dataset / "train" / "red_circle")]
    assert len(names) == TRAIN_PER_CLASS + 1 and "corrupt.jpg" in names and "notes.txt" not in names
    suffixes = {p.suffix for split in ("train", "val") for p in data.list_images(dataset / split)}
    assert suffixes == set(EXTENSIONS)


def make_classes(root, names, images_per_class=1):
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(images_per_class):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / name / f"{i}.png")


@pytest.mark.parametrize("case, message", [
    ("missing data folder", "data folder not found"),
    ("missing train folder", "train: folder not found"),
    ("no val or test", "no val or test folder"),
    ("no classes", "no class subfolders"),
    ("single class", "only one class"),
])
def test_bad_dataset_folders_raise_naming_the_path(tmp_path, case, message):
    root = tmp_path / "DATA"
    if case != "missing data folder":
        root.mkdir()
    if case not in ("missing data folder", "missing train folder"):
        (root / "train").mkdir()
    if case in ("no classes", "single class"):
        (root / "val").mkdir()
    if case == "single class":
        make_classes(root / "train", ["only"])
    with pytest.raises(data.DataError, match=message) as err:
        train_dir, _ = data.dataset_splits(root)
        data.find_classes(train_dir)
    assert str(root) in str(err.value)
    with pytest.raises(SystemExit, match=message):  # the command line says the same, without a traceback
        train.main(["--data", str(root), *MODEL])


def test_test_folder_stands_in_for_val_and_unknown_val_classes_raise(tmp_path):
    make_classes(tmp_path / "train", ["a", "b"])
    make_classes(tmp_path / "test", ["b"])
    train_dir, val_dir = data.dataset_splits(tmp_path)
    assert val_dir == tmp_path / "test"
    assert data.scan_split(val_dir, data.find_classes(train_dir)) == [(str(tmp_path / "test" / "b" / "0.png"), 1)]
    make_classes(tmp_path / "val", ["c"])
    assert data.dataset_splits(tmp_path)[1] == tmp_path / "val"
    with pytest.raises(data.DataError, match=f"{tmp_path / 'val' / 'c'}: class 'c' is not one of"):
        data.scan_split(tmp_path / "val", ["a", "b"])


def test_empty_class_folder_warns_and_keeps_the_class(tmp_path, caplog):
    make_classes(tmp_path / "train", ["a", "c"], images_per_class=2)
    (tmp_path / "train" / "b").mkdir()
    classes = data.find_classes(tmp_path / "train")
    with caplog.at_level(logging.WARNING, logger="vit_fast.data"):
        samples = data.scan_split(tmp_path / "train", classes)
    assert classes == ["a", "b", "c"]
    assert sorted({label for _, label in samples}) == [0, 2]  # c keeps index 2
    assert f"{tmp_path / 'train' / 'b'}: empty class folder" in caplog.text


def test_undecodable_images_are_set_aside_by_collate_and_warned_once(tmp_path, caplog):
    make_classes(tmp_path, ["a"], images_per_class=2)
    good = tmp_path / "a" / "0.png"
    truncated = tmp_path / "a" / "truncated.jpg"
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(jpeg, "JPEG")
    truncated.write_bytes(jpeg.getvalue()[:300])
    dataset = data.ImageDataset([(str(good), 0), (str(truncated), 0), (str(tmp_path / "a" / "1.png"), 0)], 32)
    batch = dataset.collate([dataset[i] for i in range(3)])
    assert batch.images.shape == (2, 3, 32, 32) and batch.images.dtype == torch.uint8
    assert batch.labels.tolist() == [0, 0] and batch.paths == [str(good), str(tmp_path / "a" / "1.png")]
    assert [path for path, _ in batch.skipped] == [str(truncated)]
    warned = set()
    with caplog.at_level(logging.WARNING, logger="vit_fast.data"):
        assert data.report_skipped(batch.skipped, warned) == 1
        assert data.report_skipped(batch.skipped, warned) == 1  # counted again, not warned again
    assert caplog.text.count(str(truncated)) == 1
    empty = dataset.collate([dataset[1]])
    assert empty.images.shape == (0, 3, 32, 32) and empty.labels.shape == (0,)


def test_augmentation_is_uint8_and_a_function_of_seed_epoch_and_index(dataset):
    samples = [(str(p), 0) for p in data.list_images(dataset / "val" / "red_circle")]
    augmented = data.ImageDataset(samples, 48, augment=True, seed=5)
    image, label, _, error = augmented[(1, 7)]
    assert error is None and image.dtype == torch.uint8 and image.shape == (48, 48, 3)
    assert torch.equal(image, data.ImageDataset(samples, 48, augment=True, seed=5)[(1, 7)][0])
    views = [augmented[(1, epoch)][0] for epoch in range(4)]
    assert not all(torch.equal(views[0], v) for v in views[1:])
    plain = data.ImageDataset(samples, 48)
    assert torch.equal(plain[(1, 0)][0], plain[(1, 3)][0])  # eval view: the centre crop, every epoch
    batch = plain.collate([plain[i] for i in range(2)])
    assert batch.images.shape == (2, 3, 48, 48) and batch.images.is_contiguous(memory_format=torch.channels_last)


def test_random_resized_crop_boxes_stay_inside_the_image():
    rng = np.random.default_rng(0)
    for width, height in [(64, 64), (500, 375), (30, 400), (1000, 20)]:
        for _ in range(50):
            left, top, right, bottom = data.random_resized_crop_box(width, height, rng)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height


def test_jpeg_reduced_decoding_matches_the_full_decode(tmp_path):
    """Large JPEGs decode at 1/2..1/8 scale (draft); the crop box must be rescaled with them."""
    y, x = np.mgrid[0:600, 0:800]
    pixels = np.stack([x * 255 // 800, y * 255 // 600, (x + y) * 255 // 1400], axis=-1).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    image = data.ImageDataset([(str(path), 0)], 64)[0][0]
    with Image.open(path) as full:
        box = data.center_crop_box(*full.size)
        expected = np.array(full.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR, box=box))
    assert np.abs(image.numpy().astype(int) - expected.astype(int)).mean() < 3

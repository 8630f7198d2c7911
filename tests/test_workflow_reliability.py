"""Reliability of the workflow commands (train, evaluate, predict, examples/classify_folder.py).

Empty batches (every file of a batch unreadable), command-line mistakes (one ``prog: error:``
line, exit status 2, no traceback), metrics.csv against last.pt whenever the process dies, the
learning-rate schedule across a resume with another batch size, 16-bit and EXIF-rotated images,
a full disk while saving, the DDP collective timeout, and checkpoints read with weights_only.

On the CPU with vit_tiny_patch16_224 cut to 1 block at 32 px, on 2 classes of 4 generated
pictures each (the PyTorch path: VIT_FAST_FORCE_TORCH=1, as in test_workflow.py).
"""
import contextlib
import csv
import errno
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import vit_fast
from vit_fast import cli, data, devices, evaluate, loop, predict, run_files, train
from vit_fast.dispatch import FORCE_TORCH_ENV
from workflow_helpers import torch_path  # noqa: F401  (autouse: the PyTorch path)

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-arg", "depth=1"]
TRAIN = [*MODEL, "--lr", "1e-3", "--warmup-epochs", "0.5", "--seed", "1", "--workers", "0"]
CLASSES = {"blue": (30, 40, 220), "red": (220, 30, 30)}


def make_data(root, corrupt):
    """root/{train,val}/{blue,red}/*.png (4 and 2 per class); ``corrupt``: one bad file in each split."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name, colour in CLASSES.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
                pixels[8:32, 8:32] = colour
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
        if corrupt:
            (root / split / "red" / "corrupt.png").write_bytes(b"not a PNG")
    return root


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("CLEAN"), corrupt=False)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("DIRTY"), corrupt=True)


def quiet(main, argv):
    """main(argv) with its stdout captured; returns (result, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main([str(a) for a in argv])
    return result, out.getvalue()


def read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(clean, tmp_path_factory):
    """One epoch on clean data: the checkpoints the command-line tests pass around."""
    out = tmp_path_factory.mktemp("run")
    # a tuple-valued model argument: it must survive torch.load(weights_only=True)
    _, stdout = quiet(train.main, ["--data", clean, *TRAIN, "--model-arg", "pixel_mean=(0.5, 0.5, 0.5)",
                                   "--epochs", "1", "--batch-size", "4", "--out", out])
    return out, stdout


@pytest.fixture(scope="module")
def dirty_run(dirty, tmp_path_factory):
    """One epoch at batch size 1 on data with an unreadable file per split: whole batches are empty."""
    out = tmp_path_factory.mktemp("dirty_run")
    _, stdout = quiet(train.main, ["--data", dirty, *TRAIN, "--epochs", "1", "--batch-size", "1", "--out", out])
    return out, stdout


# ----------------------------------------------------------------------------- A: empty batches


def test_train_skips_batches_whose_every_file_is_unreadable(dirty_run):
    out, stdout = dirty_run
    summary = [line for line in stdout.splitlines() if line.startswith("epoch 1/1")]
    assert len(summary) == 1
    assert "(8 images)" in summary[0] and "skipped unreadable images: 1 train, 1 val" in summary[0]
    rows = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1"] and all(math.isfinite(float(r["train_loss"])) for r in rows)


def test_evaluate_skips_an_empty_batch_and_counts_it(run, dirty, capsys):
    out, _ = run
    assert evaluate.main(["--weights", str(out / "best.pt"), "--data", str(dirty / "val"), "--batch-size", "1",
                          "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "4 images, 2 classes, 1 unreadable skipped" in printed


def test_predict_one_corrupt_file_gets_its_error_line(run, dirty, capsys):
    out, _ = run
    corrupt = dirty / "val" / "red" / "corrupt.png"
    assert predict.main(["--weights", str(out / "last.pt"), str(corrupt)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"error: {corrupt}: cannot read image" in captured.err and "1 of 1 images" in captured.err


def test_predict_batch_size_1_classifies_the_image_after_a_corrupt_one(run, dirty, capsys):
    out, _ = run
    corrupt, good = dirty / "val" / "red" / "corrupt.png", dirty / "val" / "blue" / "0.png"
    assert predict.main(["--weights", str(out / "last.pt"), str(corrupt), str(good), "--batch-size", "1",
                         "--topk", "1"]) == 1
    captured = capsys.readouterr()
    assert [line.split(": ")[0] for line in captured.out.splitlines()] == [str(good)]
    assert f"error: {corrupt}: cannot read image" in captured.err


# ----------------------------------------------------------------------------- B, I: command-line mistakes


def usage_error(main, argv, capsys):
    """Run main(argv), expecting a usage error: exit status 2, one error line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert exc.value.code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def bad_files(run, tmp_path_factory):
    """Files that are not vit_fast.train checkpoints, under the names a user might pass them."""
    root = tmp_path_factory.mktemp("bad")
    last = (run[0] / "last.pt").read_bytes()
    (root / "empty.pth").write_bytes(b"")
    (root / "truncated.pth").write_bytes(last[:len(last) // 2])
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(2, 192)}, str(root / "weights.safetensors"))
    np.savez(root / "ViT.npz", embedding=np.zeros(3))
    return root


class Payload:
    """Pickles as a call that creates a file: what torch.load without weights_only would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def payload(run, tmp_path):
    """A last.pt-shaped checkpoint whose model entry carries a __reduce__ payload."""
    marker = tmp_path / "payload_ran"
    checkpoint = torch.load(run[0] / "last.pt", weights_only=True)
    checkpoint["model"] = Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(checkpoint, path)
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("name, expected", [
    ("empty.pth", "cannot read it as a torch checkpoint (empty file)"),
    ("truncated.pth", "cannot read it as a torch checkpoint"),
    ("weights.safetensors", "holds bare weights without the classes"),
    ("ViT.npz", "holds bare weights without the classes"),
    ("missing.pt", "checkpoint not found"),
])
def test_predict_and_evaluate_name_an_unusable_weights_file(command, name, expected, bad_files, dirty, capsys):
    path = bad_files / name
    argv = ["--weights", path, dirty / "val"] if command == "predict" else ["--weights", path, "--data", dirty / "val"]
    line = usage_error({"predict": predict.main, "evaluate": evaluate.main}[command], argv, capsys)
    assert line.startswith(f"python -m vit_fast.{command}: error: argument --weights: {path}: ")
    assert expected in line


@pytest.mark.parametrize("command", ["predict", "evaluate", "train"])
def test_a_pickle_payload_is_refused_and_never_runs(command, payload, dirty, capsys):
    path, marker = payload
    argv = {"predict": ["--weights", path, dirty / "val"],
            "evaluate": ["--weights", path, "--data", dirty / "val"],
            "train": ["--resume", path, "--data", dirty]}[command]
    line = usage_error(getattr({"predict": predict, "evaluate": evaluate, "train": train}[command], "main"), argv,
                       capsys)
    assert f"{path}: refused" in line and "open" in line
    assert not marker.exists()


def test_run_checkpoints_load_with_weights_only(run):
    out, _ = run
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["model_kwargs"]["pixel_mean"] == (0.5, 0.5, 0.5)
    assert {"optimizer", "scheduler", "metrics", "steps_per_epoch", "world_size"} <= set(last)
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("extra, expected", [
    (["--epochs", "0"], "argument --epochs: expected a positive integer, got 0"),
    (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
    (["--img-size", "30"], "argument --img-size: expected a multiple of vit_tiny_patch16_224's patch size 16, got 30"),
    (["--workers", "-1"], "argument --workers: expected an integer >= 0"),
    (["--label-smoothing", "1"], "argument --label-smoothing: expected a number in [0, 1)"),
    (["--dist-timeout", "soon"], "argument --dist-timeout: expected a positive duration"),
    (["--weights", "missing.pth"], "argument --weights: missing.pth: file not found"),
    pytest.param(["--device", "cuda"], "argument --device: 'cuda' asked for, but CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["--device", "tpu9"], "argument --device: expected cpu, cuda or cuda:N"),
])
def test_train_usage_errors_are_one_line_before_any_work(extra, expected, clean, tmp_path, capsys):
    out = tmp_path / "run"
    line = usage_error(train.main, ["--data", clean, *TRAIN, *extra, "--out", out], capsys)
    assert line.startswith("python -m vit_fast.train: error: ") and expected in line
    assert not out.exists()  # refused upfront: no run folder, no epoch started


def test_train_resume_needs_last_pt(run, bad_files, dirty, capsys):
    out, _ = run
    line = usage_error(train.main, ["--resume", out / "best.pt", "--data", dirty], capsys)
    assert f"argument --resume: {out / 'best.pt'} holds the model only" in line
    assert f"resume from {out / 'last.pt'}" in line and f"--weights {out / 'best.pt'}" in line
    line = usage_error(train.main, ["--resume", bad_files / "truncated.pth", "--data", dirty], capsys)
    assert f"argument --resume: {bad_files / 'truncated.pth'}: cannot read it as a torch checkpoint" in line


def test_best_pt_starts_a_new_run_with_weights(run, clean, tmp_path):
    out, _ = run
    _, stdout = quiet(train.main, ["--data", clean, *TRAIN, "--weights", out / "best.pt", "--epochs", "1",
                                   "--batch-size", "4", "--out", tmp_path / "run"])
    assert "epoch 1/1" in stdout


def test_cli_usage_errors_exit_2_without_a_traceback(bad_files, clean):
    env = {**os.environ, FORCE_TORCH_ENV: "1"}
    for argv in (["vit_fast.train", "--data", str(clean), *TRAIN, "--epochs", "0"],
                 ["vit_fast.predict", "--weights", str(bad_files / "weights.safetensors"), str(clean)]):
        proc = subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("python -m vit_fast.")


# ----------------------------------------------------------------------------- C: metrics.csv against last.pt


class Died(Exception):
    pass


@pytest.mark.parametrize("moment", ["after last.pt, before metrics.csv", "before last.pt is replaced"])
def test_metrics_csv_agrees_with_last_pt_whatever_the_moment_of_death(moment, clean, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--data", clean, *TRAIN, "--epochs", "3", "--batch-size", "4", "--out", out]
    if moment.startswith("after"):
        write, calls = run_files.write_metrics, []

        def write_then_die(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # epoch 2: last.pt already holds it
                raise Died
            return write(*args, **kwargs)

        monkeypatch.setattr(run_files, "write_metrics", write_then_die)
    else:
        save = run_files.save_atomic

        def save_or_die(obj, path):
            if path.name == "last.pt" and obj["epoch"] == 2:
                raise Died
            return save(obj, path)

        monkeypatch.setattr(run_files, "save_atomic", save_or_die)
    with pytest.raises(Died):
        quiet(train.main, argv)
    monkeypatch.undo()
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["epoch"] == (2 if moment.startswith("after") else 1)

    quiet(train.main, ["--resume", out / "last.pt"])
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    final = torch.load(out / "last.pt", weights_only=True)
    assert [row["epoch"] for row in final["metrics"]] == [1, 2, 3]
    for row, kept in zip(rows, final["metrics"]):
        assert float(row["val_top1"]) == pytest.approx(kept["val_top1"], rel=1e-5)
        assert float(row["lr"]) == pytest.approx(kept["lr"], rel=1e-5)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- D: the LR schedule on resume


def test_resume_with_another_batch_size_keeps_the_schedule_in_epochs(clean, tmp_path, monkeypatch):
    out = tmp_path / "run"
    plot, written = run_files.plot_curves, []

    def plot_then_stop(*args):
        plot(*args)
        written.append(1)
        if len(written) == 2:
            raise Died

    monkeypatch.setattr(run_files, "plot_curves", plot_then_stop)
    with pytest.raises(Died):  # 8 images at batch 4: 2 steps per epoch
        quiet(train.main, ["--data", clean, *TRAIN, "--epochs", "4", "--batch-size", "4", "--out", out])
    monkeypatch.undo()
    _, stdout = quiet(train.main, ["--resume", out / "last.pt", "--batch-size", "2"])  # 4 steps per epoch
    assert "resume: 4 steps per epoch (batch size 2 x 1 process(es)) where" in stdout
    assert "ran 2 (batch size 4 x 1 process(es)); the learning-rate schedule is kept in epochs" in stdout

    def lr_at(epochs, steps, warmup_steps):  # the schedule at the end of an epoch
        return 1e-3 * 0.5 * (1 + math.cos(math.pi * (epochs * steps - warmup_steps) / (4 * steps - warmup_steps)))

    rows = read_metrics(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[1]["lr"]) == pytest.approx(lr_at(2, 2, 1), rel=1e-5)
    assert float(rows[2]["lr"]) == pytest.approx(lr_at(3, 4, 2), rel=1e-5)
    # the same point of the schedule as the uninterrupted batch-4 run (before: about 3x as high)
    assert float(rows[2]["lr"]) == pytest.approx(lr_at(3, 2, 1), rel=1e-3)
    assert float(rows[3]["lr"]) == pytest.approx(0, abs=1e-12)


# ----------------------------------------------------------------------------- E: decoding


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    pixels = np.zeros((32, 32), dtype=np.uint16)
    pixels[:, :16], pixels[:, 16:] = 128 * 257, 65535  # mid grey | white
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")
    image = data.ImageDataset([(str(tmp_path / "deep.png"), 0)], 28)[0][0].numpy()  # centre crop of 28 of 32
    assert image.shape == (28, 28, 3)
    assert (image[:, :10] == 128).all() and (image[:, -10:] == 255).all()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    y, x = np.mgrid[0:300, 0:600]  # wide: after a quarter turn the crop box must fit the tall image
    pixels = np.stack([x * 255 // 600, y * 255 // 300, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[data.EXIF_ORIENTATION] = orientation
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    with Image.open(path) as img:
        upright = ImageOps.exif_transpose(img).convert("RGB")
    assert upright.size == ((300, 600) if orientation in (6, 8) else (600, 300))
    # 64 px from a 262 px crop: JPEG's reduced decoding (draft) is taken, its box rescaled upright
    image = data.ImageDataset([(str(path), 0)], 64)[0][0].numpy().astype(int)
    expected = np.array(upright.resize((64, 64), Image.Resampling.BILINEAR, box=data.center_crop_box(*upright.size)))
    assert np.abs(image - expected.astype(int)).mean() < 3
    augmented = data.ImageDataset([(str(path), 0)], 64, augment=True)
    assert all(augmented[(0, epoch)][3] is None for epoch in range(5))  # crop boxes inside the upright image


# ----------------------------------------------------------------------------- F: a full disk


def test_a_full_disk_while_saving_names_the_path_and_leaves_no_temp_file(clean, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def save_half_then_fail(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(SystemExit) as exc:
        quiet(train.main, ["--data", clean, *TRAIN, "--epochs", "1", "--batch-size", "4", "--out", out])
    message = str(exc.value)
    assert message.startswith(f"error: cannot write {out / 'best.pt'}: No space left on device")
    assert "disk full" in message
    assert sorted(p.name for p in out.iterdir()) == []  # no best.tmp, no best.pt.tmp

    previous = tmp_path / "kept.pt"
    previous.write_bytes(b"previous checkpoint")
    with pytest.raises(run_files.SaveError, match=f"cannot write {previous}.*the previous kept.pt is kept"):
        run_files.save_atomic({"x": 1}, previous)
    assert previous.read_bytes() == b"previous checkpoint" and sorted(tmp_path.glob("*.tmp")) == []


@pytest.mark.parametrize("command, extra", [(predict, ["--json"]), (evaluate, ["--json"]), (evaluate, ["--plot"])])
def test_a_full_disk_while_writing_a_report_is_one_error_line(command, extra, run, clean, tmp_path, monkeypatch):
    """evaluate --json / --plot and predict --json write through a temporary file: a failed write is
    one error line naming the file (no traceback), and neither a half file nor the temporary stays."""
    out, _ = run
    target = tmp_path / ("report.png" if extra == ["--plot"] else "report.json")
    real_open, real_savefig = open, matplotlib.figure.Figure.savefig

    def fail_after_a_partial_write(path):
        Path(path).write_bytes(b"{ partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_failing_on_the_report(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(target)) and "w" in mode:
            fail_after_a_partial_write(path)
        return real_open(path, mode, *args, **kwargs)

    def savefig_failing(self, path, *args, **kwargs):
        if str(path).startswith(str(target)):
            fail_after_a_partial_write(path)
        return real_savefig(self, path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_failing_on_the_report)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_failing)
    argv = ([str(clean / "val" / "red")] if command is predict else ["--data", str(clean / "val")])
    with pytest.raises(SystemExit) as exc:
        quiet(command.main, ["--weights", str(out / "best.pt"), *argv, *extra, str(target)])
    message = str(exc.value)
    assert message.startswith(f"error: cannot write {target}: No space left on device") and "disk full" in message
    assert "\n" not in message
    assert sorted(tmp_path.iterdir()) == []  # neither report.* nor report.*.tmp


# ----------------------------------------------------------------------------- G: the DDP timeout


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("2m", 120), ("1.5min", 90), ("1h", 3600)])
def test_dist_timeout_parses_seconds_or_minutes(text, seconds):
    assert cli.duration(text) == seconds


def test_dist_timeout_reaches_init_process_group(monkeypatch, clean):
    seen = {}
    monkeypatch.setattr(devices.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(devices.dist, "get_rank", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args, _ = train.resolve_args(["--data", str(clean), "--dist-timeout", "3m"])
    assert args.dist_timeout == 180
    assert devices.init_distributed("cpu", args.dist_timeout) == (1, 2, torch.device("cpu"))
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=3)}
    args, _ = train.resolve_args(["--data", str(clean)])
    assert args.dist_timeout == 600  # the default: 10 minutes, not the backend's 30
    assert "--dist-timeout" in train.build_parser().format_help()


# ----------------------------------------------------------------------------- H: smaller things


def test_predict_on_a_folder_without_images_says_so(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = usage_error(predict.main, ["--weights", run[0] / "last.pt", tmp_path / "empty"], capsys)
    assert f"no images found in {tmp_path / 'empty'}" in line


def test_progress_bar_shows_running_means_every_step(clean, tmp_path, monkeypatch):
    postfixes = []

    class Bar:
        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, **kwargs):
            postfixes.append(kwargs)

    monkeypatch.setattr(loop, "tqdm", Bar)
    quiet(train.main, ["--data", clean, *TRAIN, "--epochs", "1", "--batch-size", "2", "--out", tmp_path / "run"])
    assert len(postfixes) == 4  # 8 images at batch 2: every step, not every 10th
    assert all(set(p) == {"loss", "acc", "img_s", "lr", "refresh"} and p["refresh"] is False for p in postfixes)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert float(postfixes[-1]["loss"]) == pytest.approx(float(rows[0]["train_loss"]), abs=1e-4)


@pytest.fixture(scope="module")
def classify_folder():
    spec = importlib.util.spec_from_file_location("classify_folder", REPO / "examples" / "classify_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    torch.manual_seed(0)
    torch.save(vit_fast.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, depth=1).state_dict(), path)
    return path


def test_classify_folder_checks_labels_and_exits_1_on_unreadable_files(classify_folder, tiny_weights, dirty,
                                                                       tmp_path, capsys, monkeypatch):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    base = [dirty / "val", "--model", "vit_tiny_patch16_224", "--weights", tiny_weights, "--device", "cpu"]
    # the factory builds 224 px, 12 blocks: load the weights through a model of their shape
    create = vit_fast.create_model
    monkeypatch.setattr(vit_fast, "create_model", lambda name, **kw: create(name, img_size=32, depth=1, **kw))
    with pytest.raises(SystemExit) as exc:
        classify_folder.main([str(a) for a in [*base, "--labels", labels]])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert f"argument --labels: {labels} has 2 names; the model has 3 classes" in err

    labels.write_text("cat\ndog\nbird\n")
    assert classify_folder.main([str(a) for a in [*base, "--labels", labels, "--batch-size", "1"]]) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 4 and all(line.split(": ")[1].split()[0] in ("cat", "dog", "bird")
                                              for line in out.splitlines())
    assert f"error: {dirty / 'val' / 'red' / 'corrupt.png'}: cannot read image" in err
    assert "1 of 5 images could not be read" in err


def test_evaluate_report_json_still_written(run, dirty, tmp_path, capsys):
    out, _ = run
    report = tmp_path / "eval.json"
    assert evaluate.main(["--weights", str(out / "last.pt"), "--data", str(dirty / "val"), "--json", str(report),
                          "--workers", "0"]) == 0
    assert json.loads(report.read_text())["classes"] == sorted(CLASSES)


# ----------------------------------------------------------------------------- J: --cuda-graph


def test_cuda_graph_flag_parses_off_by_default(clean):
    assert train.resolve_args(["--data", str(clean)])[0].cuda_graph is False
    assert train.resolve_args(["--data", str(clean), "--cuda-graph"])[0].cuda_graph is True
    assert train.resolve_args(["--data", str(clean), "--cuda-graph", "--no-cuda-graph"])[0].cuda_graph is False
    assert "--cuda-graph" in train.build_parser().format_help()


@pytest.mark.parametrize("extra, env, expected", [
    (["--optimizer", "sgd"], {}, "argument --cuda-graph: needs --optimizer adamw"),
    ([], {"WORLD_SIZE": "2"}, "argument --cuda-graph: one process only (2 started)"),
])
def test_cuda_graph_refusals_are_usage_errors(extra, env, expected, clean, tmp_path, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    line = usage_error(train.main, ["--data", clean, *TRAIN, "--cuda-graph", *extra, "--out", out], capsys)
    assert expected in line and not out.exists()


def graph_argv(data_dir, out, *extra):
    # batch 4: full batches are captured, a short last batch (or one that lost a file) runs eagerly
    return ["--data", data_dir, *TRAIN, "--epochs", "2", "--batch-size", "4", "--out", out, *extra]


@pytest.fixture(scope="module")
def eager_dirty_run(dirty, tmp_path_factory):
    out = tmp_path_factory.mktemp("eager")
    _, stdout = quiet(train.main, graph_argv(dirty, out, "--freeze-epochs", "1"))
    return out, stdout


def test_cuda_graph_without_cuda_says_so_and_trains_the_same_weights(dirty, eager_dirty_run, tmp_path):
    eager, _ = eager_dirty_run
    _, stdout = quiet(train.main, graph_argv(dirty, tmp_path / "run", "--freeze-epochs", "1", "--cuda-graph"))
    notes = [line for line in stdout.splitlines() if "--cuda-graph" in line]
    assert notes == ["note: --cuda-graph has no effect without CUDA; training eagerly on cpu"]
    graphed, reference = (torch.load(p / "last.pt", weights_only=True) for p in (tmp_path / "run", eager))
    for key, value in reference["model"].items():
        assert torch.equal(graphed["model"][key], value), key  # bit-identical: the eager step ran
    assert graphed["args"]["cuda_graph"] is True


class ReplayingCapture:
    """A CPU stand-in for vit_fast.graphs.cuda_capture: warm-up and capture as the real one runs them;
    each replay re-runs the captured body, its gradients set to None first (a replayed backward
    overwrites the graph's gradients, it does not accumulate)."""

    def __init__(self):
        self.captures = self.replays = 0

    def __call__(self, body, device, *, warmup=3, warmup_body=None, before_capture=None, **kwargs):
        self.captures += 1
        for _ in range(warmup):
            (warmup_body or body)()
        before_capture()
        capture = self

        class Graph:
            output = body()

            def replay(self):
                capture.replays += 1
                before_capture()
                loss = body()
                with torch.no_grad():
                    self.output.copy_(loss)

        return Graph()


def test_captured_path_runs_on_cpu_through_a_stand_in_capture(dirty, eager_dirty_run, tmp_path, monkeypatch):
    """The --cuda-graph orchestration of vit_fast.loop (capture at the first full batch, one capture per
    --freeze-epochs phase, other batch shapes eager with their gradients zeroed in place, the learning
    rate a tensor the schedule fills) gives the eager run's weights; its last.pt holds plain floats and
    resumes without the flag."""
    from vit_fast import graphs

    capture = ReplayingCapture()
    monkeypatch.setattr(loop, "can_capture", lambda device: True)
    monkeypatch.setattr(graphs, "check_capturable", lambda optimizer: None)  # no capturable AdamW on a CPU
    monkeypatch.setattr(loop, "capture_train_step", lambda *args, **kwargs: graphs.TrainStep(
        *args, **kwargs, _capture=capture))
    out = tmp_path / "run"
    _, stdout = quiet(train.main, graph_argv(dirty, out, "--freeze-epochs", "1", "--cuda-graph"))
    assert "training step replayed from a CUDA graph" in stdout
    assert capture.captures == 2  # the head-only phase, then the full one
    # 9 files at batch 4, one unreadable: 3 steps per epoch, the short ones eager
    assert 2 <= capture.replays <= 4
    eager, _ = eager_dirty_run
    graphed, reference = (torch.load(p / "last.pt", weights_only=True) for p in (out, eager))
    for key, value in reference["model"].items():  # bit-identical (the CPU's tensor learning rate is float64)
        assert torch.equal(graphed["model"][key], value), key
    for row, kept in zip(read_metrics(out / "metrics.csv"), read_metrics(eager / "metrics.csv")):
        row.pop("images_per_s"), kept.pop("images_per_s")
        assert row == kept
    groups = graphed["optimizer"]["param_groups"]
    assert all(isinstance(g["lr"], float) and isinstance(g["initial_lr"], float) for g in groups)
    assert all(isinstance(lr, float) for lr in graphed["scheduler"]["_last_lr"])
    monkeypatch.undo()
    _, stdout = quiet(train.main, ["--resume", out / "last.pt", "--no-cuda-graph", "--epochs", "3"])
    assert "epoch 3/3" in stdout and "--cuda-graph" not in stdout


@pytest.mark.gpu
def test_captured_training_matches_eager_on_cuda(clean, tmp_path, monkeypatch):
    """Two epochs on the GPU with bf16 autocast on the kernels: the captured run's weights and losses
    agree with the eager run's within bf16 tolerance."""
    monkeypatch.delenv(FORCE_TORCH_ENV)
    base = ["--data", clean, *TRAIN, "--epochs", "2", "--batch-size", "3", "--amp", "--device", "cuda"]
    _, eager_out = quiet(train.main, [*base, "--out", tmp_path / "eager"])
    _, graph_out = quiet(train.main, [*base, "--cuda-graph", "--out", tmp_path / "graph"])
    assert "training step replayed from a CUDA graph" in graph_out
    assert "training step replayed" not in eager_out
    eager, graphed = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("eager", "graph"))
    for key, value in eager["model"].items():
        torch.testing.assert_close(graphed["model"][key].float(), value.float(), rtol=2e-2, atol=2e-3, msg=key)
    for a, b in zip(read_metrics(tmp_path / "graph" / "metrics.csv"), read_metrics(tmp_path / "eager" / "metrics.csv")):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=2e-2, abs=2e-2)
        assert float(a["lr"]) == pytest.approx(float(b["lr"]), rel=1e-6)
    assert all(isinstance(g["lr"], float) for g in graphed["optimizer"]["param_groups"])

"""Real photos and shared machines: square photo folders cropped as documented, writes that
fail cleanly on a full disk, one run per folder, empty class folders."""
import errno
import signal
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT, script_env
from test_folders import _folder
from test_runs import one_line_error, script, start, tiny, wait_for

IMAGE_METHODS = {"rotation": 32, "patch_location": 80, "jigsaw": 64, "inpainting": 32, "colorization": 32,
                 "split_brain": 32, "simclr": 32, "moco": 32}  # image size of each method's default


# -- square photo folders ----------------------------------------------------------------
@pytest.fixture(scope="module")
def photo_folders(tmp_path_factory):
    """Square photos larger than every --image-size (96 x 96, as pre-resized releases), and
    photos of mixed sizes and shapes, some smaller than --image-size."""
    root = tmp_path_factory.mktemp("photos")
    square = _folder(root / "square", {f"train/{c}": 10 for c in "abcd"} | {f"val/{c}": 3 for c in "abcd"},
                     size=(96, 96))
    mixed = root / "mixed"
    for i, size in enumerate(((40, 60), (80, 80), (24, 24), (120, 70))):
        _folder(mixed / f"part{i}", {f"train/{c}": 10 for c in "ab"} | {f"val/{c}": 2 for c in "ab"}, size=size)
        for split in ("train", "val"):  # merge the parts into one folder of mixed sizes
            for p in (mixed / f"part{i}" / split).rglob("*.jpg"):
                target = mixed / split / p.parent.name / f"{i}-{p.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                p.rename(target)
    return {"square": square, "mixed": mixed}


# Each method's own crop of photos, and what it gives: (function name, shape of one output).
CROPS = {"rotation": "augment", "patch_location": "prepare_patches", "jigsaw": "crop_window", "inpainting": "augment",
         "colorization": "augment", "split_brain": "augment", "simclr": "augment", "moco": "augment"}


@pytest.mark.parametrize("kind", ["square", "mixed"])
@pytest.mark.parametrize("method", list(IMAGE_METHODS))
def test_every_method_crops_photos_of_any_shape(method, kind, photo_folders, tmp_path, monkeypatch):
    """Photos of every shape reach the method whole (Run.to_device crops nothing; patch
    location takes the loader's uint8 batch itself and gives its crop every image's size),
    and the method's own crop gives --batch-size images of --image-size (patch location:
    pairs of patches) for its networks, whatever the photos' shape."""
    import importlib
    module = importlib.import_module(method)
    size = IMAGE_METHODS[method]
    seen, made = [], []
    to_device, crop = common.Run.to_device, getattr(module, CROPS[method])

    def recording(self, images):
        out = to_device(self, images)
        seen.append(isinstance(out, common.WholeImages))
        return out

    def cropping(*a, **k):
        if method == "patch_location":
            seen.append(k.get("sizes") is not None)
        out = crop(*a, **k)
        made.append(tuple((out[0] if isinstance(out, tuple) else out).shape))
        return out

    monkeypatch.setattr(common.Run, "to_device", recording)
    monkeypatch.setattr(module, CROPS[method], cropping)
    r = module.main(["--dataset", "folder", "--data-dir", str(photo_folders[kind]), "--batch-size", "8",
                     "--workers", "0", "--max-steps", "2", "--no-eval", "--log-every", "0",
                     "--out", str(tmp_path / "run")])
    # Square photos at --image-size (patch location's load size) come as a plain batch of squares.
    whole = not (method == "patch_location" and kind == "square")
    assert r["steps"] == 2 and seen[:2] == [whole, whole]  # (patch location's test-split accuracy crops once more)
    side = module.Args().patch if method == "patch_location" else size
    assert made and all(shape == (8, 3, side, side) for shape in made[:2]), made


def test_a_folder_of_image_size_squares_is_taken_as_it_is(tmp_path):
    root = _folder(tmp_path, {"train/a": 4, "train/b": 4, "val/a": 1, "val/b": 1}, size=(40, 40))
    args = common.parse_args(common.Args, ["--dataset", "folder", "--data-dir", str(root), "--image-size", "40",
                                           "--load-size", "40", "--workers", "0", "--out", str(tmp_path / "r")])
    data = common.load_image_data(args)
    run = common.Run(args, "demo")
    try:
        batch, _ = common.collate_whole([data.pretrain[i] for i in range(4)])
        assert isinstance(batch, common.WholeImages)
        x = run.to_device(batch)
        assert torch.equal(x, batch.pixels.float() / 255)  # no crop: they are --image-size squares already
    finally:
        run.close()


# -- writes that fail cleanly ------------------------------------------------------------
def test_a_full_disk_while_saving_keeps_the_last_checkpoint(tiny_folder, tmp_path, monkeypatch):
    """The second checkpoint cannot be written: one message naming the file, the error and the
    free space, exit code 3, no temporary file left, the first checkpoint intact."""
    import rotation
    save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        if str(f).endswith("checkpoint.pt.tmp"):
            calls.append(f)
            if len(calls) == 2:
                with open(f, "wb") as half:
                    half.write(b"half a checkpoint")  # what a full disk leaves behind
                raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(common.RunError) as e:
        rotation.main(tiny(tiny_folder, out, "--epochs", "3", "--no-eval"))
    assert e.value.code == common.WRITE_FAILED == 3
    message = str(e.value)
    assert f"could not write {out / 'checkpoint.pt'}: No space left on device" in message
    assert "MB free there" in message and "the checkpoint of step 10 is kept" in message
    assert not list(out.glob("*.tmp"))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 10


def test_torch_saves_own_write_error_counts_as_a_failed_write(tmp_path):
    """torch.save reports a full disk as a RuntimeError from its C++ writer (the message
    users saw); it is a failed write like an OSError, and other RuntimeErrors are not."""
    def writer_error(f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(common.WriteFailed, match="could not write .*x.pt: .*unexpected pos"):
        common._write_atomic(tmp_path / "x.pt", writer_error)
    with pytest.raises(RuntimeError, match="something else"):
        common._write_atomic(tmp_path / "y.pt", lambda f: (_ for _ in ()).throw(RuntimeError("something else")))
    assert not list(tmp_path.iterdir())


def test_pictures_and_the_log_that_cannot_be_written_are_warnings(tiny_folder, tmp_path, monkeypatch, capsys):
    """A picture or a log line lost to a full disk does not end the run: one warning each,
    and the checkpoint, the encoder and eval.json are written as usual."""
    import inpainting
    common._WARNED.clear()
    real = common._write_atomic

    def no_pictures(path, write):
        if path.suffix == ".png":
            raise common.WriteFailed(path, OSError(errno.ENOSPC, "No space left on device"))
        return real(path, write)

    monkeypatch.setattr(common, "_write_atomic", no_pictures)
    out = tmp_path / "run"
    original = common.Run._write_log

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    def full_log(self, record):
        if self._log_file and not isinstance(self._log_file, FullDisk):
            self._log_file.close()
            self._log_file = FullDisk()
        return original(self, record)

    monkeypatch.setattr(common.Run, "_write_log", full_log)
    r = inpainting.main(tiny(tiny_folder, out, "--epochs", "2"))
    err = capsys.readouterr().err
    assert err.count("warning: could not write") == 3  # grid.png (every epoch: once), neighbours.png, log.jsonl
    assert "grid.png" in err and "neighbours.png" in err and "log.jsonl" in err and "the run goes on" in err
    assert r["steps"] == 20 and (out / "encoder.pt").is_file() and (out / "eval.json").is_file()


def test_a_failed_write_is_one_line_and_exit_code_3(capsys):
    def main():
        raise common.WriteFailed(ROOT / "nowhere" / "eval.json", OSError(errno.ENOSPC, "No space left on device"))

    with pytest.raises(SystemExit) as e:
        common.cli(main)
    err = capsys.readouterr().err
    assert e.value.code == 3 and err.count("\n") == 1 and err.startswith("error: could not write")


# -- one run per folder ------------------------------------------------------------------
def test_a_resume_of_a_folder_in_use_refuses_and_kill_9_frees_it(tiny_folder, tmp_path):
    """Two --resume of one run (two terminals, or a job requeued while the old one still
    runs): the second refuses. The OS frees the lock when the process dies, even by kill -9."""
    out = tmp_path / "run"
    first = start("rotation.py", *tiny(tiny_folder, out, "--epochs", "1000", "--no-eval"))
    try:
        assert wait_for(lambda: (out / "checkpoint.pt").is_file(), 120), first.stderr.read() if first.poll() else ""
        err = one_line_error(script("rotation.py", "--resume", str(out), "--max-steps", "1"))
        assert f"run folder {out} is in use by process {first.pid} on host" in err
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    resumed = script("rotation.py", "--resume", str(out), "--max-steps", str(step + 2), "--no-eval")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_two_runs_started_together_one_refuses(tiny_folder, tmp_path):
    """Started a moment apart, before either has saved a checkpoint: the second refuses, and
    the first goes on."""
    out = tmp_path / "run"
    a = start("rotation.py", "--out", str(out), "--log-every", "0", "--no-eval")  # the built-in data: seconds to render
    try:
        assert wait_for(lambda: (out / ".lock").is_file() and (out / ".lock").read_text().strip(), 60)
        assert not (out / "checkpoint.pt").exists()
        b = subprocess.run([sys.executable, "rotation.py", *tiny(tiny_folder, out, "--max-steps", "1")],
                           cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
        assert b.returncode == 2 and f"is in use by process {a.pid}" in b.stderr and a.poll() is None
    finally:
        a.send_signal(signal.SIGTERM)
        a.wait(60)


# -- empty class folders -----------------------------------------------------------------
def test_an_empty_class_folder_is_refused_naming_it(tmp_path):
    root = _folder(tmp_path, {"a": 5, "b": 5})
    (root / "empty").mkdir()
    with pytest.raises(common.RunError, match=r"1 class folder\(s\) without images: empty"):
        common.folder_splits(root)
    split = _folder(tmp_path / "split", {"train/a": 3, "train/b": 3, "val/a": 1, "val/b": 1})
    (split / "val" / "c").mkdir()
    with pytest.raises(common.RunError, match="without images: c"):
        common.folder_splits(split)


def test_a_test_split_with_fewer_classes_says_so(tmp_path):
    root = _folder(tmp_path, {"train/a": 3, "train/b": 3, "train/c": 3, "val/a": 1, "val/b": 1})
    classes, _, test, summary = common.folder_splits(root)
    assert classes == ["a", "b", "c"] and len(test) == 2
    assert "2 test images (val/, 2 of the classes)" in summary
    (root / "val" / "d").mkdir()
    _folder(root, {"val/d": 1})
    with pytest.raises(common.RunError, match="has classes that .* lacks: \\['d'\\]"):
        common.folder_splits(root)


# -- decoding ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["torchcodec", "torchvision", "pil"])
def test_every_decoder_reads_the_same_pixels(name, tmp_path, monkeypatch):
    """common.read_image decodes with TorchCodec when it is installed, else torchvision.io,
    else PIL; each gives PIL's pixels for a PNG exactly and for a JPEG within a few levels."""
    import numpy as np
    from PIL import Image
    if name == "torchcodec":
        pytest.importorskip("torchcodec.decoders")
    root = _folder(tmp_path, {"a": 1}, size=(37, 53))
    _folder(tmp_path / "png", {"a": 1}, size=(37, 53), ext="png")
    monkeypatch.setenv("SSL_DECODER", name)
    common.jpeg_decoder.cache_clear()
    try:
        assert common.jpeg_decoder() == name
        for path, tolerance in ((root / "a" / "000.jpg", 3), (tmp_path / "png" / "a" / "000.png", 0)):
            with Image.open(path) as im:
                expected = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)
            x = common.read_image(path)
            assert x.shape == (3, 37, 53) and x.dtype == torch.uint8
            assert (x.int() - expected.int()).abs().max() <= tolerance
    finally:
        common.jpeg_decoder.cache_clear()


def test_the_decoder_is_chosen_once_and_said_by_name(monkeypatch):
    monkeypatch.setenv("SSL_DECODER", "nonsense")
    common.jpeg_decoder.cache_clear()
    try:
        with pytest.raises(common.RunError, match="SSL_DECODER must be one of torchcodec, torchvision, pil"):
            common.jpeg_decoder()
        monkeypatch.delenv("SSL_DECODER")
        common.jpeg_decoder.cache_clear()
        try:
            import torchcodec.decoders  # noqa: F401
            expected = "torchcodec"
        except Exception:
            expected = "torchvision"
        assert common.jpeg_decoder() == expected
    finally:
        common.jpeg_decoder.cache_clear()

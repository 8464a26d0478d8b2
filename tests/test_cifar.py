"""--dataset cifar10 on a tiny copy in torchvision's own format (written here, no download),
and benchmarks/cifar_jpegs.py, which turns such a copy into the JPEG folder the CIFAR-10
tables ran on."""
import pickle
import sys

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

import common
import rotation
from conftest import ROOT

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    """cifar-10-batches-py/ with 5 training batches of 8 images and a test batch of 10, as
    torchvision's pickles; torchvision checks the real files' md5 sums, so that check is off."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name, n, offset):
        labels = [(offset + i) % 10 for i in range(n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, :1024] = np.array(labels, dtype=np.uint8)[:, None] * 20  # the red plane says the label
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)  # str keys, as the real (Python 2) files load

    for k in range(1, 6):
        batch(f"data_batch_{k}", 8, 8 * k)
    batch("test_batch", 10, 0)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: True)  # the metadata file's
    return tmp_path / "data"


def test_a_method_trains_on_torchvisions_cifar10(tiny_cifar, tmp_path):
    data = common.load_image_data(common.parse_args(rotation.Args, ["--dataset", "cifar10", "--data-dir",
                                                                    str(tiny_cifar)]))
    assert len(data.pretrain) == 40 and len(data.test) == 10 and data.classes[0] == "airplane"
    x, y = data.train[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and (x[0] == 20 * int(y)).all()
    r = rotation.main(["--dataset", "cifar10", "--data-dir", str(tiny_cifar), "--batch-size", "8", "--max-steps", "2",
                       "--no-eval", "--log-every", "0", "--out", str(tmp_path / "run")])
    assert r["steps"] == 2


def test_the_jpeg_folder_holds_every_image_by_class(tiny_cifar, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cifar_jpegs
    out = cifar_jpegs.main(["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "jpg")])
    train = sorted(out.glob("train/*/*.jpg"))
    assert len(train) == 40 and len(list(out.glob("test/*/*.jpg"))) == 10
    assert {p.parent.name for p in train} == set(CLASSES) and (out / "train" / "dog" / "0003.jpg").is_file()
    first = common.read_image(out / "train" / "bird" / "0000.jpg")
    assert first.shape == (3, 32, 32) and abs(first[0].float().mean().item() - 40) < 10  # bird: label 2, red 40
    with pytest.raises(common.RunError, match="not empty"):
        cifar_jpegs.main(["--data-dir", str(tiny_cifar), "--out", str(out)])
    r = rotation.main(["--dataset", "folder", "--data-dir", str(out), "--batch-size", "8", "--max-steps", "1",
                       "--no-eval", "--log-every", "0", "--workers", "0", "--out", str(tmp_path / "run")])
    assert r["steps"] == 1

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A small ImageFolder (train/ and test/, 10 classes) cut from the built-in shapes,
    so end-to-end runs take seconds and also go through the image-folder path."""
    import torchvision.utils as vutils
    import common
    root = tmp_path_factory.mktemp("tiny")
    for split, num, seed in (("train", 160, 0), ("test", 60, 1)):
        images, labels = common.make_shapes(num, 32, seed=seed)
        for i, (x, y) in enumerate(zip(images, labels)):
            folder = root / split / common.SHAPE_CLASSES[int(y)]
            folder.mkdir(parents=True, exist_ok=True)
            vutils.save_image(x.float() / 255, folder / f"{i:04d}.png")
    return root


def script_env():
    """Environment for running a method script as a user would, from the repo root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env

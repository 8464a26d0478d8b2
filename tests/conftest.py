import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))
from same_steps import tensors as checkpoint_tensors  # noqa: E402  (name, tensor) of a nested checkpoint


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


def torchrun(script: str, *argv, timeout: int = 300, processes: int = 2):
    """`torchrun --standalone --nproc_per_node=2 <script> <options>` as a user would start it,
    through tests/dist_state.py, so that every process's state is kept beside the checkpoint."""
    import subprocess
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", "tests/dist_state.py", script, *map(str, argv)],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)


# Batch-norm running statistics stay each process's own, as in the official MoCo code;
# everything else a checkpoint holds is the same on every process.
PER_PROCESS = ("running_mean", "running_var", "num_batches_tracked")




def differences_between_processes(folder: Path, world: int = 2) -> list[str]:
    """What differs between the processes of a run made through tests/dist_state.py:
    the names of the checkpoint's tensors (batch-norm running statistics aside) that are
    not equal on every process, with the largest difference."""
    states = [dict(checkpoint_tensors(torch.load(folder / f"state-rank{r}.pt", weights_only=True))) for r in range(world)]
    assert all(s.keys() == states[0].keys() for s in states), "the processes hold different parts"
    assert len(states[0]) > 0
    differ = []
    for name, first in states[0].items():
        if name.endswith(PER_PROCESS):
            continue
        for other in states[1:]:
            if not torch.equal(first, other[name]):
                gap = (first.double() - other[name].double()).abs().max().item() if first.is_floating_point() else ""
                differ.append(f"{name} {gap}")
    return differ

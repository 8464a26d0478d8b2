"""Run a method as `torchrun` would, keeping what every process holds:

    torchrun --standalone --nproc_per_node=2 tests/dist_state.py moco.py <options>

The checkpoint holds rank 0's state alone. Here every process also writes, whenever a
checkpoint is written, the same parts as it holds them, to state-rank<r>.pt in the run
folder, so that a test can compare the processes (conftest.same_on_every_process)."""
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

_save = common.Run._save


def _save_every_process(self, parts):
    _save(self, parts)
    state = {name: part.detach().cpu().clone() if isinstance(part, torch.Tensor) else common.unwrap(part).state_dict()
             for name, part in parts.items()}
    torch.save(state, self.out / f"state-rank{self.rank}.pt")


common.Run._save = _save_every_process
method = importlib.import_module(Path(sys.argv[1]).stem)
sys.argv = sys.argv[1:]
common.cli(method.main)

"""Run a method as `torchrun` would, keeping what every process holds:

    torchrun --standalone --nproc_per_node=2 tests/dist_state.py moco.py <options>

The checkpoint holds rank 0's state alone. Here every process also writes, whenever a
checkpoint is written, the same parts as it holds them, to state-rank<r>.pt in the run
folder, so that a test can compare the processes (conftest.same_on_every_process).

SIGTERM_AFTER_AGREEMENT=<rank>:<step> in the environment sends that process SIGTERM just
after the collective in which the processes agree whether to stop, at that step: its
handler then runs there, on that process alone (the race a scheduler's signal can hit)."""
import importlib
import os
import signal
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

if os.environ.get("SIGTERM_AFTER_AGREEMENT"):
    _rank, _at = map(int, os.environ["SIGTERM_AFTER_AGREEMENT"].split(":"))
    _flags, _all_reduce = common.Run._flags, common.dist.all_reduce

    def _flags_signalled_after_the_collective(self):
        def all_reduce(*a, **k):
            done = _all_reduce(*a, **k)
            if self.rank == _rank and self.step == _at:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode, inside _flags
            return done
        common.dist.all_reduce = all_reduce
        try:
            return _flags(self)
        finally:
            common.dist.all_reduce = _all_reduce

    common.Run._flags = _flags_signalled_after_the_collective

method = importlib.import_module(Path(sys.argv[1]).stem)
sys.argv = sys.argv[1:]
common.cli(method.main)

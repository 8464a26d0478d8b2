"""Run under `torchrun --nproc_per_node=2` (gloo) by test_simclr.py and test_moco.py.

Checks that what several processes compute together equals what one process
computes on the same global batch. Prints "ok <rank>" when every check holds."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import moco  # noqa: E402
import simclr  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same global batch on every process
n_global, d = 12, 5
z1_all = torch.randn(n_global, d, dtype=torch.float64)
z2_all = torch.randn(n_global, d, dtype=torch.float64)

# One process, whole global batch: the reference loss and gradient.
r1, r2 = z1_all.clone().requires_grad_(), z2_all.clone().requires_grad_()
reference = simclr.nt_xent(r1, r2, 0.5)
reference.backward()

# Each process holds its share; the negatives come from every process.
n = n_global // world
mine = slice(rank * n, (rank + 1) * n)
z1, z2 = z1_all[mine].clone().requires_grad_(), z2_all[mine].clone().requires_grad_()
loss = simclr.nt_xent(common.gather_with_grad(z1), common.gather_with_grad(z2), 0.5)
loss.backward()
assert torch.allclose(loss, reference), (loss.item(), reference.item())
# DDP averages parameter gradients over the processes; averaged, they equal the one-process gradient.
assert torch.allclose(z1.grad / world, r1.grad[mine]) and torch.allclose(z2.grad / world, r2.grad[mine])

# MoCo's shuffling BN: the key batch is shuffled across processes, then restored.
x = torch.arange(rank * n, (rank + 1) * n, dtype=torch.float32).view(n, 1)
shuffled, unshuffle = moco.shuffle_keys(x)
everything = common.gather(shuffled).flatten().sort().values
assert torch.equal(everything, torch.arange(n_global, dtype=torch.float32))  # a permutation of the global batch
crossed = common.gather(torch.tensor([float((shuffled.flatten() // n != rank).any())]))
assert crossed.sum() > 0  # images did move between processes
assert torch.equal(moco.unshuffle_keys(shuffled, unshuffle), x)
print(f"ok {rank}", flush=True)
dist.destroy_process_group()

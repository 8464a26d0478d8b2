"""jigsaw.py: the permutation set, the puzzles, and the script."""
import json
import subprocess
import sys

import pytest
import torch

import jigsaw
from conftest import ROOT, script_env
from test_rotation import run_script, tiny


def min_hamming(perms):
    d = (perms.unsqueeze(0) != perms.unsqueeze(1)).sum(-1)
    return int(d.fill_diagonal_(10).min())


@pytest.fixture(scope="module")
def perms100():
    return jigsaw.make_permutations(100, seed=0)


def test_permutations_are_distinct_permutations(perms100):
    assert perms100.shape == (100, 9) and perms100.dtype == torch.long
    assert (perms100.sort(1).values == torch.arange(9)).all()
    assert len({tuple(p) for p in perms100.tolist()}) == 100
    assert torch.equal(perms100, jigsaw.make_permutations(100, seed=0))  # fixed by the seed


def test_each_greedy_choice_is_as_far_as_any_permutation_could_be(perms100):
    import itertools
    every = torch.tensor(list(itertools.permutations(range(9))))
    min_dist = (every != perms100[0]).sum(1)
    for k in range(1, 30):
        best_possible = int(min_dist.max())
        assert int((perms100[:k] != perms100[k]).sum(1).min()) == best_possible
        min_dist = torch.minimum(min_dist, (every != perms100[k]).sum(1))


def test_greedy_sets_are_farther_apart_than_random_sets(perms100):
    gen = torch.Generator().manual_seed(0)
    random_mins = [min_hamming(torch.stack([torch.randperm(9, generator=gen) for _ in range(100)]))
                   for _ in range(5)]
    assert min_hamming(perms100) == 6 and max(random_mins) < 6


def test_a_thousand_permutations_in_seconds():
    perms = jigsaw.make_permutations(1000, seed=0)
    assert len({tuple(p) for p in perms.tolist()}) == 1000 and min_hamming(perms) >= 5


def cell_images(n, size):
    """Channel 0: which cell (0..8) the pixel is in; channels 1, 2: its row and column."""
    r = torch.arange(size)
    cell = size // 3
    rows, cols = r.view(-1, 1).expand(size, size), r.view(1, -1).expand(size, size)
    ids = (rows // cell).clamp(max=2) * 3 + (cols // cell).clamp(max=2)
    return torch.stack([ids, rows, cols]).float().unsqueeze(0).repeat(n, 1, 1, 1)


def test_inverse_permutation_rebuilds_the_cells(perms100):
    torch.manual_seed(0)
    x = cell_images(50, 64)
    tiles, labels = jigsaw.make_puzzle(x, perms100, tile=18)
    assert tiles.shape == (50, 9, 3, 18, 18) and labels.max() < 100
    for i in range(50):
        perm = perms100[labels[i]]
        shown = tiles[i, :, 0].flatten(1)
        assert (shown == shown[:, :1]).all()  # each tile lies inside a single cell
        assert torch.equal(shown[:, 0].long(), perm)  # tile position j shows cell perm[j]
        restored = tiles[i, perm.argsort(), 0, 0, 0]
        assert torch.equal(restored.long(), torch.arange(9))
    # Tiles are taken at random places inside their cells: the gap varies.
    top_left_rows = tiles[:, :, 1, 0, 0]
    assert len(top_left_rows.unique()) > 9


def test_tiles_are_normalised_one_by_one():
    scale = 2 + 3 * torch.rand(4, 9, 3, 1, 1)  # std well above the 1e-2 floor that keeps flat tiles flat
    tiles = torch.rand(4, 9, 3, 10, 10) * scale + torch.rand(4, 9, 3, 1, 1)
    out = jigsaw.normalize_tiles(tiles)
    assert out.mean((-2, -1)).abs().max() < 1e-5
    assert ((out.std((-2, -1)) - 1).abs() < 0.05).all()
    flat = jigsaw.normalize_tiles(torch.full((1, 9, 3, 10, 10), 0.7))
    assert flat.abs().max() == 0  # a flat tile stays flat, no noise is blown up


def test_end_to_end(tiny_folder, tmp_path):
    jigsaw.main(tiny(tiny_folder, tmp_path, "--image-size", "32", "--tile", "9", "--num-perms", "10", "--epochs", "2"))
    saved = json.loads((tmp_path / "eval.json").read_text())
    for key in ("knn_top1", "linear_top1", "random_knn_top1", "random_linear_top1", "pretext_top1"):
        assert 0.0 <= saved[key] <= 1.0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["perms"].shape == (10, 9)


def test_a_short_run_learns(tmp_path):
    r = jigsaw.main(["--out", str(tmp_path), "--max-steps", "60", "--no-eval", "--log-every", "0"])
    assert r["pretext_top1"] > 0.1  # chance: 1/100


def test_too_small_image_size_is_one_line(tmp_path):
    proc = run_script("jigsaw.py", "--image-size", "40", "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "needs at least 42 px" in proc.stderr


def test_two_process_torchrun(tiny_folder, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "jigsaw.py", *tiny(tiny_folder, tmp_path, "--image-size", "32", "--tile", "9",
                                              "--num-perms", "10", "--max-steps", "3", "--no-eval")],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

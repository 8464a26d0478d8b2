"""jigsaw.py: the permutation set, the puzzles, and the script."""
import json

import pytest
import torch

import jigsaw
from conftest import differences_between_processes, torchrun
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


def test_each_greedy_choice_has_the_largest_average_distance_to_those_before(perms100):
    """The paper's Algorithm 1: the next permutation is, among all not yet chosen, one whose
    summed (= average) Hamming distance to the chosen ones is largest."""
    import itertools
    every = torch.tensor(list(itertools.permutations(range(9))))
    total = (every != perms100[0]).sum(1)
    taken = torch.zeros(len(every), dtype=torch.bool)
    index = {tuple(p): i for i, p in enumerate(every.tolist())}
    taken[index[tuple(perms100[0].tolist())]] = True
    for k in range(1, 40):
        best_possible = int(total[~taken].max())
        assert int((perms100[:k] != perms100[k]).sum()) == best_possible
        taken[index[tuple(perms100[k].tolist())]] = True
        total = total + (every != perms100[k]).sum(1)


def test_the_minimum_rule_puts_the_nearest_distance_first():
    import itertools
    perms = jigsaw.make_permutations(30, seed=0, rule="minimum")
    every = torch.tensor(list(itertools.permutations(range(9))))
    min_dist = (every != perms[0]).sum(1)
    for k in range(1, 30):
        assert int((perms[:k] != perms[k]).sum(1).min()) == int(min_dist.max())
        min_dist = torch.minimum(min_dist, (every != perms[k]).sum(1))


def test_selection_key_orders_large_sets_right():
    """Totals above 2^14 (sets of more than about 1,800 permutations) must not spill into
    the minimum's bits, nor the tie-break into the total's."""
    total = torch.tensor([20_000, 20_001, 9 * 362_880 - 1, 5])
    tie = torch.tensor([1023, 0, 0, 1023])
    assert jigsaw.selection_key(total, tie).argmax() == 2  # the largest total wins
    assert jigsaw.selection_key(total[:2], tie[:2]).argmax() == 1  # a larger total beats any tie-break
    min_dist = torch.tensor([5, 5, 4, 6])
    assert jigsaw.selection_key(total, tie, min_dist).argmax() == 3  # the minimum first, whatever the total
    assert jigsaw.selection_key(total[:3], tie[:3], min_dist[:3]).argmax() == 1


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


def test_tiles_come_with_their_margin():
    torch.manual_seed(0)
    x = cell_images(20, 64)
    tiles, _ = jigsaw.make_puzzle(x, jigsaw.make_permutations(5), tile=14, margin=2)
    assert tiles.shape == (20, 9, 3, 18, 18)
    inner = tiles[..., 2:-2, 2:-2]
    assert ((inner[:, :, 0] == inner[:, :, 0, :1, :1])).all()  # the tile itself lies in one cell
    rows = tiles[:, :, 1, :, 0]
    assert ((rows[..., 1:] - rows[..., :-1]) <= 1).all()  # consecutive rows of the image (edge repeated)


def test_chromatic_jitter_moves_channels_of_colour_images_and_greys_the_rest():
    torch.manual_seed(0)
    n, t, m = 40, 10, 2
    # Every channel the same ramp: a channel's value at (0, 0) tells where it was cut.
    ramp = (torch.arange(t + 2 * m).view(-1, 1) * 100 + torch.arange(t + 2 * m).view(1, -1)).float()
    tiles = ramp.expand(n, 9, 3, t + 2 * m, t + 2 * m).clone()
    grey = torch.arange(n) < 12
    out = jigsaw.chromatic_jitter(tiles, m, grey)
    assert out.shape == (n, 9, 3, t, t)
    corner = out[..., 0, 0]  # (N, 9, 3): 100 x row offset + column offset
    dy, dx = corner // 100, corner % 100
    assert (dy >= 0).all() and (dy <= 2 * m).all() and (dx >= 0).all() and (dx <= 2 * m).all()
    assert (corner[grey] == 100 * m + m).all()  # grey images: every channel at the tile's own place
    colour = corner[~grey]
    assert (colour != colour[..., :1]).any(-1).float().mean() > 0.8  # channels moved apart
    assert len(dy[~grey].unique()) == 2 * m + 1 and len(dx[~grey].unique()) == 2 * m + 1
    assert torch.equal(out[..., 1:, :] - out[..., :-1, :], torch.full_like(out[..., 1:, :], 100))  # whole shifts


def test_tiles_are_normalised_one_by_one():
    scale = 2 + 3 * torch.rand(4, 9, 3, 1, 1)  # std well above the 1e-2 floor that keeps flat tiles flat
    tiles = torch.rand(4, 9, 3, 10, 10) * scale + torch.rand(4, 9, 3, 1, 1)
    out = jigsaw.normalize_tiles(tiles)
    assert out.mean((-2, -1)).abs().max() < 1e-5
    assert ((out.std((-2, -1)) - 1).abs() < 0.05).all()
    mean, std = tiles.mean((-2, -1), keepdim=True), tiles.std((-2, -1), keepdim=True)  # unbiased, per tile and channel
    assert torch.allclose(out, (tiles - mean) / (std + 1e-2), atol=1e-5)
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
    proc = torchrun("jigsaw.py", *tiny(tiny_folder, tmp_path, "--image-size", "32", "--tile", "9", "--num-perms", "10",
                                       "--max-steps", "3", "--no-eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert differences_between_processes(tmp_path) == []  # the permutations among them

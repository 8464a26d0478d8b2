"""patch_location.py: the geometry of the pairs, the colour defences, and the script."""
import json

import pytest
import torch
import torch.nn.functional as F

import patch_location as pl
from conftest import differences_between_processes, torchrun
from test_rotation import run_script, tiny


def coordinate_images(n, size):
    """Pixel values that say where they are: channel 0 = row, channel 1 = column."""
    r = torch.arange(size, dtype=torch.float32)
    img = torch.stack([r.view(-1, 1).expand(size, size), r.view(1, -1).expand(size, size),
                       torch.zeros(size, size)])
    return img.unsqueeze(0).repeat(n, 1, 1, 1)


@pytest.mark.parametrize("patch, gap, jitter, size", [(16, 8, 1, 80), (8, 3, 1, 32), (10, 0, 0, 30), (6, 3, 3, 40),
                                                    (16, 8, 1, 66)])
def test_labels_match_the_neighbours_true_offset_and_bounds_hold(patch, gap, jitter, size):
    torch.manual_seed(0)
    x = coordinate_images(800, size)
    centre, neighbour, labels, corners = pl.sample_pairs(x, patch, gap, jitter)
    assert centre.shape == neighbour.shape == (800, 3, patch, patch)
    # Patches are real crops of the image (their content is their position), never outside it.
    for p, c in ((centre, corners[:, 0]), (neighbour, corners[:, 1])):
        assert torch.equal(p[:, 0, 0, 0], c[:, 0].float()) and torch.equal(p[:, 1, 0, 0], c[:, 1].float())
        assert torch.equal(p[:, 0, -1, 0], c[:, 0].float() + patch - 1)
        assert (c >= 0).all() and (c + patch <= size).all()
    # The offset from the centre patch to the neighbour, read from the pixels:
    dy = neighbour[:, 0, 0, 0] - centre[:, 0, 0, 0]
    dx = neighbour[:, 1, 0, 0] - centre[:, 1, 0, 0]
    step = patch + gap
    for k, (row, col) in enumerate(pl.POSITIONS):
        sel = labels == k
        assert sel.any()
        for d, cell in ((dy[sel], row - 1), (dx[sel], col - 1)):
            # Up to 2 x jitter away from the grid position, and no further.
            assert ((d - cell * step).abs() <= 2 * jitter).all()
    # Every position occurs, about equally often.
    assert labels.bincount(minlength=8).min() > 50
    # Neighbouring patches are separated by at least the gap minus the jitter of both.
    side = (labels == 3) | (labels == 4)  # left or right neighbour
    assert ((dx[side].abs() - patch) >= gap - 2 * jitter).all()
    if jitter:
        assert (dy[side] != 0).any()  # jitter moves the patches


def positional_shortcut(patch, gap, jitter, size, n=20_000, seed=0):
    """How often a lookup from the centre patch's corner to the label most often seen
    there, fitted on n sampled pairs, is right on n more: what a network could learn
    from the patches' places alone (image content tied to place: sky, ground, borders)."""
    torch.manual_seed(seed)
    x = torch.zeros(1, 1, size, size, dtype=torch.uint8).expand(n, -1, -1, -1)  # geometry only
    (_, _, fit, fit_at), (_, _, score, score_at) = (pl.sample_pairs(x, patch, gap, jitter) for _ in range(2))
    counts = {}
    for place, y in zip((fit_at[:, 0, 0] * 1000 + fit_at[:, 0, 1]).tolist(), fit.tolist()):
        counts.setdefault(place, torch.zeros(8))[y] += 1
    guess = [int(counts[p].argmax()) if p in counts else 0 for p in (score_at[:, 0, 0] * 1000 + score_at[:, 0, 1]).tolist()]
    return (torch.tensor(guess) == score).float().mean().item()


def test_where_the_patches_sit_does_not_give_the_label_away():
    """Paper sec. 3: the grid lands anywhere it fits, and the neighbour is one of the eight
    whatever the place. At the default geometry the shortcut is at chance (1/8); the
    grid's places cover the image, and the proportions are the paper's."""
    a = pl.Args()
    assert abs(positional_shortcut(a.patch, a.gap, a.jitter, a.image_size) - 1 / 8) < 0.02
    torch.manual_seed(0)
    x = torch.zeros(1, 1, a.image_size, a.image_size).expand(2000, -1, -1, -1)
    _, _, _, corners = pl.sample_pairs(x, a.patch, a.gap, a.jitter)
    span = pl.grid_span(a.patch, a.gap, a.jitter)
    origins = corners[:, 0] - (a.patch + a.gap)  # the grid's top-left cell, from the (jittered) centre patch
    assert origins.min() == 0 and origins.max() == a.image_size - span + 2 * a.jitter  # from edge to edge
    assert span <= a.image_size <= 1.25 * span  # the grid fills about 80% of the side, as the paper's
    assert 2 * a.gap == a.patch and round(0.07 * a.patch) == a.jitter and a.image_size == 5 * a.patch


def test_image_too_small_for_the_grid_is_refused():
    with pytest.raises(ValueError):
        pl.sample_pairs(torch.rand(2, 3, 65, 65), 16, 8, 1)


def test_patches_are_normalised_one_by_one():
    x = torch.rand(6, 3, 8, 8) * torch.tensor([1, 5, 20.0]).view(1, 3, 1, 1) + 3
    out = pl.normalize_patches(x)
    assert out.mean((2, 3)).abs().max() < 1e-5  # every channel of every patch: zero mean
    assert torch.allclose(out.square().mean((1, 2, 3)), torch.ones(6), atol=1e-3)  # unit mean square per patch
    assert torch.allclose(pl.normalize_patches(x * 7 + 2), out, atol=1e-3)  # brightness and contrast are gone


def test_downsampling_blurs_the_chosen_share_of_patches():
    torch.manual_seed(0)
    x = torch.rand(600, 3, 16, 16)
    out, out2 = pl.downsample_some((x, x), 0.33)  # the centres and the neighbours, each patch drawn on its own
    assert out.shape == out2.shape == x.shape and not torch.equal(out, out2)
    changed = (out - x).abs().flatten(1).amax(1) > 1e-6
    assert 0.25 < changed.float().mean() < 0.41
    assert torch.equal(out[~changed], x[~changed])
    roughness = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean((1, 2, 3))  # noqa: E731
    assert (roughness(out[changed]) < roughness(x[changed])).float().mean() > 0.95  # they lost detail
    assert torch.equal(pl.downsample_some((x,), 0.0)[0], x)


def test_down_up_matrices_are_the_two_resizes():
    """downsample_some resizes every chosen patch at once by M[s] @ X @ M[s].T; that is
    F.interpolate down to s x s (bilinear, antialiased) and back up (bilinear), patch by
    patch, for every size s, on patches of a few sides."""
    torch.manual_seed(0)
    for side in (16, 9):
        x = torch.rand(side + 1, 3, side, side)
        m = pl.down_up(side, x.device)
        for s in range(1, side + 1):
            small = F.interpolate(x[s:s + 1], size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            reference = F.interpolate(small, size=(side, side), mode="bilinear", align_corners=False)
            assert torch.allclose(m[s].float() @ x[s] @ m[s].float().T, reference[0], atol=1e-5)


def test_colour_dropping_keeps_one_channel_and_noises_the_others():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    out = pl.drop_colour(x)
    kept = (out == x).flatten(2).all(2)  # (N, 3): which channels are untouched
    assert (kept.sum(1) == 1).all()
    assert kept.float().mean(0).min() > 0.15  # each channel is kept sometimes
    dropped = out[~kept]
    assert dropped.std((1, 2)).max() < 0.02  # noise of 1/100 of the kept channel's std


def test_projection_removes_the_green_magenta_component():
    x = torch.rand(4, 3, 5, 5)
    out = pl.project_colour(x)
    along = (out * pl.GREEN_MAGENTA.view(1, 3, 1, 1)).sum(1)
    assert along.abs().max() < 1e-6
    grey = torch.full((1, 3, 2, 2), 0.5)
    assert torch.allclose(pl.project_colour(grey), grey)  # grey has no green-magenta component


def test_end_to_end(tiny_folder, tmp_path):
    pl.main(tiny(tiny_folder, tmp_path, "--image-size", "32", "--patch", "8", "--gap", "3", "--jitter", "1",
                 "--epochs", "2"))
    saved = json.loads((tmp_path / "eval.json").read_text())
    for key in ("knn_top1", "linear_top1", "random_knn_top1", "random_linear_top1", "pretext_top1"):
        assert 0.0 <= saved[key] <= 1.0


def test_a_short_run_learns(tmp_path):
    r = pl.main(["--out", str(tmp_path), "--max-steps", "100", "--no-eval", "--log-every", "0"])
    assert r["pretext_top1"] > 0.16  # chance: 1/8, and the patches' places no longer tell


def test_too_small_image_size_is_one_line_naming_the_options(tmp_path):
    proc = run_script("patch_location.py", "--image-size", "64", "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "a 3x3 grid of 16 px patches" in proc.stderr and "needs at least 66 px" in proc.stderr


def test_two_process_torchrun(tiny_folder, tmp_path):
    proc = torchrun("patch_location.py", *tiny(tiny_folder, tmp_path, "--image-size", "32", "--patch", "8", "--gap", "3",
                                               "--jitter", "1", "--max-steps", "3", "--no-eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert differences_between_processes(tmp_path) == []
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3

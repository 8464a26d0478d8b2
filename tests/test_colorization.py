"""colorization.py: ab bins, soft encoding, rebalancing, annealed mean, and the script."""
import json
import math

import pytest
import torch

import colorization as col
import common
from conftest import differences_between_processes, torchrun
from test_rotation import tiny


@pytest.fixture(scope="module")
def bins():
    return col.ab_bins()


def test_bins_are_on_the_grid_and_in_gamut(bins):
    assert bins.shape[1] == 2 and 200 < len(bins) < 320
    assert torch.equal(bins, (bins / 10).round() * 10)  # multiples of 10
    assert len(torch.unique(bins, dim=0)) == len(bins)
    as_set = {tuple(b) for b in bins.tolist()}
    red = common.rgb_to_lab(torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)).flatten()  # a = 80.1, b = 67.2
    assert (0.0, 0.0) in as_set and (80.0, 70.0) in as_set
    assert (10 * (red[1:] / 10).round()).tolist() == [80.0, 70.0]  # pure red's cell is that bin
    assert (-110.0, 110.0) not in as_set and (100.0, 100.0) not in as_set  # far outside sRGB
    # Every bin's cell holds a colour that is really in the sRGB gamut.
    for a, b in bins[::17].tolist():
        lab = torch.tensor([[L, a, b] for L in range(1, 100)], dtype=torch.float32).view(-1, 3, 1, 1)
        back = common.rgb_to_lab(common.lab_to_rgb(lab)).flatten(1)  # clipping moves out-of-gamut colours
        assert ((back[:, 1:] - torch.tensor([a, b])).abs().max(1).values <= 5.5).any()


def test_soft_encoding_sums_to_one_and_peaks_at_the_nearest_bin(bins):
    torch.manual_seed(0)
    ab = (torch.rand(2, 2, 3, 3) - 0.5) * 120
    Z = col.soft_encode(ab, bins, k=5, sigma=5.0)
    assert Z.shape == (2, len(bins), 3, 3)
    assert torch.allclose(Z.sum(1), torch.ones(2, 3, 3))
    assert ((Z > 0).sum(1) == 5).all()
    for n in range(2):
        for i in range(3):
            for j in range(3):
                d = ((bins - ab[n, :, i, j]) ** 2).sum(1)
                assert Z[n, :, i, j].argmax() == d.argmin()
                q1, q2 = Z[n, :, i, j].topk(2).indices  # Gaussian weights: ratio exp(-(d1 - d2) / 2 sigma^2)
                ratio = Z[n, q1, i, j] / Z[n, q2, i, j]
                assert ratio.item() == pytest.approx(math.exp(-(d[q1] - d[q2]).item() / 50), rel=1e-4)


def test_the_window_search_finds_the_same_bins_as_the_full_search(bins):
    """nearest_bins (the k nearest searched near the pixel's own cell, distances to those
    bins only) against the search over all bins, distances written out plainly: the same
    k distances everywhere, the same bins wherever the k-th and
    (k + 1)-th distances differ (on an exact tie either bin is a k-th nearest), for every
    colour of a dense sample of the sRGB cube, for averages of colours (the targets are
    pooled to the output size), and for ab values far outside the gamut (full search)."""
    torch.manual_seed(0)
    table = col.bin_table(bins)
    steps = torch.linspace(0, 1, 40)
    rgb = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij")).reshape(3, -1).T
    ab_gamut = common.rgb_to_lab(rgb.reshape(-1, 3, 1, 1))[:, 1:].reshape(-1, 2)
    ab_mixed = (ab_gamut + ab_gamut[torch.randperm(len(ab_gamut))]) / 2
    ab_outside = (torch.rand(500, 2) - 0.5) * 600
    for flat in (ab_gamut, ab_mixed, ab_outside):
        d2 = ((flat[:, None, :] - bins[None]) ** 2).sum(2)  # P x Q
        near_d2, near = col.nearest_bins(flat, table, 5)
        full_d2, full = d2.topk(6, dim=1, largest=False)
        assert torch.equal(near_d2, full_d2[:, :5])
        untied = full_d2[:, 4] < full_d2[:, 5]
        assert untied.float().mean() > 0.99
        assert torch.equal(near[untied].sort(1).values, full[untied, :5].sort(1).values)
        ab = flat[untied].T.reshape(1, 2, 1, -1)
        assert torch.equal(col.soft_encode(ab, bins, table=table), col.soft_encode(ab, bins))


def test_the_sparse_loss_is_eq_2_over_the_dense_targets(bins):
    """Training keeps Z sparse (the 5 nearest bins and their weights) and weights each pixel
    by its nearest bin; written out with the dense Z of soft_encode, eq. 2 is
    -mean_hw v(argmax_q Z_hwq) sum_q Z_hwq log softmax(logits)_hwq: the same loss and the
    same gradient."""
    torch.manual_seed(0)
    ab = (torch.rand(3, 2, 4, 4) - 0.5) * 150
    table = col.bin_table(bins)
    near, Z = col.soft_targets(ab, bins, table=table)
    assert near.shape == Z.shape == (3, 5, 4, 4)
    dense = col.soft_encode(ab, bins, table=table)
    assert torch.equal(near[:, 0], dense.argmax(1))  # nearest first: v's bin
    assert torch.equal(dense.gather(1, near), Z)
    w = torch.rand(len(bins)) + 0.5
    logits = torch.randn(3, len(bins), 4, 4, requires_grad=True)
    sparse = col.multinomial_loss(logits, near, Z, w[near[:, 0]])
    (g_sparse,) = torch.autograd.grad(sparse, logits)
    reference = -(w[dense.argmax(1)] * (dense * torch.log_softmax(logits, dim=1)).sum(1)).mean()
    (g_dense,) = torch.autograd.grad(reference, logits)
    assert sparse.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(g_sparse, g_dense, atol=1e-7)


def test_targets_are_pixels_at_the_output_stride_not_means():
    """The released code's data_ab_ss: every 4th pixel. A sharp edge between two colours
    stays two colours; a mean would make a third that no pixel has."""
    ab = torch.randn(2, 2, 32, 32) * 40
    assert torch.equal(col.ab_at(ab, 8), ab[..., ::4, ::4])
    edge = torch.zeros(1, 2, 32, 32)
    edge[..., :, 18:] = 60.0  # the edge inside the 4x4 block of columns 16-19
    assert set(col.ab_at(edge, 8).unique().tolist()) == {0.0, 60.0}
    # Training takes those pixels of the RGB image and converts only them: the same ab.
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(common.rgb_to_lab(col.ab_at(x, 8))[:, 1:], col.ab_at(col.split_lab(x)[1], 8))


def test_lightness_is_the_L_of_lab():
    """common.lightness (L from Y alone, what training feeds the network) against
    rgb_to_lab's L, over random colours, greys, black and white."""
    x = torch.cat([torch.rand(4, 3, 16, 16), torch.rand(1, 1, 16, 16).expand(1, 3, -1, -1),
                   torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)])
    assert torch.allclose(common.lightness(x), common.rgb_to_lab(x)[:, :1], atol=1e-4)


def test_rebalancing_weights_have_prior_mean_one_and_favour_rare_bins():
    prior = torch.tensor([0.7, 0.2, 0.09, 0.01])
    w = col.rebalance_weights(prior, lam=0.5)
    assert (prior * w).sum().item() == pytest.approx(1.0)
    assert (w[1:] > w[:-1]).all()  # rarer, heavier
    # By hand: ((1 - 0.5) p + 0.5 / 4) ** -1, then scaled.
    raw = (0.5 * prior + 0.125) ** -1
    assert torch.allclose(w, raw / (prior * raw).sum())
    assert torch.allclose(col.rebalance_weights(prior, lam=1.0), torch.ones(4))  # lambda = 1: no rebalancing


def test_prior_is_a_smoothed_distribution(bins):
    ab = torch.zeros(1, 2, 4, 4)
    ab[..., :2] = 40.0
    prior = col.colour_prior([ab], bins)
    assert prior.sum().item() == pytest.approx(1.0) and (prior > 0).sum() > 2  # smoothed beyond the 2 hit bins
    top = bins[prior.topk(2).indices].tolist()
    assert sorted(map(tuple, top)) == [(0.0, 0.0), (40.0, 40.0)]


def test_annealed_mean_is_the_mean_at_t1_and_tends_to_the_mode(bins):
    torch.manual_seed(0)
    logits = torch.randn(2, len(bins), 2, 2) * 3
    p = torch.softmax(logits, 1)
    mean = torch.einsum("nqhw,qc->nchw", p, bins)
    assert torch.allclose(col.annealed_mean(logits, bins, T=1.0), mean, atol=1e-4)
    mode = bins[logits.argmax(1)].permute(0, 3, 1, 2)
    assert torch.allclose(col.annealed_mean(logits, bins, T=0.01), mode, atol=0.5)
    t38 = col.annealed_mean(logits, bins, T=0.38)
    assert ((t38 - mode).abs().mean() < (mean - mode).abs().mean())  # in between


def test_end_to_end_saves_the_grid_and_the_prior(tiny_folder, tmp_path):
    col.main(tiny(tiny_folder, tmp_path, "--epochs", "2"))
    saved = json.loads((tmp_path / "eval.json").read_text())
    for key in ("knn_top1", "linear_top1", "random_knn_top1", "random_linear_top1"):
        assert 0.0 <= saved[key] <= 1.0
    prior = torch.load(tmp_path / "prior.pt", weights_only=True)
    assert prior["prior"].sum().item() == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "grid.png").is_file()
    col.main(tiny(tiny_folder, tmp_path / "reg", "--max-steps", "2", "--loss", "regression", "--no-eval"))


def test_a_short_run_beats_grey(tmp_path):
    """60 steps: the decoded colours are closer to the truth than no colour at all."""
    r = col.main(["--out", str(tmp_path), "--max-steps", "60", "--no-eval", "--log-every", "0"])
    x = common.make_shapes(500, 32, seed=1)[0].float() / 255
    ab = col.split_lab(x)[1]
    grey_error = torch.nn.functional.adaptive_avg_pool2d(ab, 8).abs().mean().item()
    assert r["pretext_ab_error"] < 0.9 * grey_error
    assert 0 < r["pretext_colourfulness"] < 2


def test_two_process_torchrun(tiny_folder, tmp_path):
    proc = torchrun("colorization.py", *tiny(tiny_folder, tmp_path, "--max-steps", "3", "--no-eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert differences_between_processes(tmp_path) == []

"""split_brain.py: the split of channels and network, the targets, and the script."""
import json

import pytest
import torch

import common
import split_brain as sb
from conftest import differences_between_processes, torchrun
from test_rotation import tiny


def test_each_half_sees_only_its_own_channels():
    """F1's output has no gradient with respect to ab, F2's none with respect to L."""
    torch.manual_seed(0)
    model = sb.SplitBrain("small", 32, ab_outputs=7, l_outputs=5).eval()
    lab = torch.randn(2, 3, 32, 32, requires_grad=True)
    out1, out2 = model(lab)
    (g1,) = torch.autograd.grad(out1.sum(), lab)
    (g2,) = torch.autograd.grad(out2.sum(), lab)
    assert g1[:, 1:].abs().max() == 0 and g1[:, :1].abs().max() > 0
    assert g2[:, :1].abs().max() == 0 and g2[:, 1:].abs().max() > 0
    assert out1.shape == (2, 7, 8, 8) and out2.shape == (2, 5, 8, 8)


@pytest.mark.parametrize("backbone, image_size", [("small", 32), ("resnet18", 32), ("resnet18", 96)])
def test_halves_and_the_representation_that_concatenates_them(backbone, image_size):
    """--halves half (the default, the paper's): each half has half the channels at every
    stage, so about a quarter of the parameters, and the two together are one network's
    width; --halves full (ours): each half a whole network."""
    full, width = common.build_backbone(backbone, image_size)
    size = sum(p.numel() for p in full.parameters())
    whole = sb.SplitBrain(backbone, image_size, 7, 5)
    paper = sb.SplitBrain(backbone, image_size, 7, 5, half_width=True)
    assert sb.Args().halves == "half" and not sb.Args().turn_hues  # the default is the paper's split
    assert whole.width == 2 * width and paper.width == width == {"small": 128, "resnet18": 512}[backbone]
    assert 0.95 * size < sum(p.numel() for p in whole.f1.parameters()) < size
    for half in (paper.f1, paper.f2):
        assert 0.24 * size < sum(p.numel() for p in half.parameters()) < 0.26 * size
        stages = [getattr(half, f"layer{i}")[-1].bn2.num_features for i in range(1, 5)]
        assert stages == [getattr(full, f"layer{i}")[-1].bn2.num_features // 2 for i in range(1, 5)]
    for model in (whole, paper):
        feats = sb.SplitBrainEncoder(model).eval()(torch.rand(2, 3, image_size, image_size))
        assert feats.shape == (2, model.width)


def test_a_resnet_run_saves_half_width_halves_that_load_as_documented(tiny_folder, tmp_path):
    """docs/split_brain.md: encoder.pt loads into SplitBrainEncoder(SplitBrain(backbone, image size, ...))."""
    sb.main(tiny(tiny_folder, tmp_path, "--backbone", "resnet18", "--max-steps", "1", "--no-eval"))
    state = torch.load(tmp_path / "encoder.pt", weights_only=True)
    encoder = sb.SplitBrainEncoder(sb.SplitBrain("resnet18", 32, 1, 1, half_width=True))
    encoder.load_state_dict(state)  # strict: every key, every shape
    assert state["f1.layer4.1.conv2.weight"].shape == (256, 256, 3, 3)
    assert encoder.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_targets_are_soft_encodings_over_the_nearest_bins():
    """H(X) of the paper's eq. 4: each value spread over its 5 nearest bins with Gaussian
    weights; checked against the formula written pixel by pixel."""
    bins = sb.ab_bins()
    torch.manual_seed(0)
    ab = (torch.rand(2, 2, 3, 3) - 0.5) * 150
    target = sb.soft_encode(ab, bins, k=5, sigma=5.0)
    assert target.shape == (2, len(bins), 3, 3) and torch.allclose(target.sum(1), torch.ones(2, 3, 3))
    # The search near each pixel's grid cell (what training uses) finds the same bins.
    assert torch.equal(sb.soft_encode(ab, bins, k=5, sigma=5.0, table=sb.bin_table(bins)), target)
    gamut = common.rgb_to_lab(torch.rand(3000, 3, 1, 1))[:, 1:].reshape(-1, 2)
    d2 = ((gamut[:, None, :] - bins[None]) ** 2).sum(2)  # P x Q, written out
    near_d2, near = sb.nearest_bins(gamut, sb.bin_table(bins), 5)
    full_d2, full = d2.topk(5, dim=1, largest=False)
    assert torch.equal(near_d2, full_d2) and torch.equal(near.sort(1).values, full.sort(1).values)
    for n in range(2):
        for i in range(3):
            for j in range(3):
                d2 = ((bins - ab[n, :, i, j]) ** 2).sum(1)
                near = d2.argsort()[:5]
                w = torch.exp(-d2[near] / (2 * 5.0 ** 2))
                expected = torch.zeros(len(bins))
                expected[near] = w / w.sum()
                assert torch.allclose(target[n, :, i, j], expected, atol=1e-6)
    centres = sb.l_centres(50)
    assert centres[0, 0] == 1.0 and centres[-1, 0] == 99.0
    L = torch.tensor([0.0, 1.99, 2.01, 50.5, 99.9, 100.0]).view(1, 1, 1, 6)
    assert sb.soft_encode(L, centres, sigma=1.0).argmax(1).flatten().tolist() == [0, 0, 1, 25, 49, 49]


def test_soft_cross_entropy_against_a_loop():
    """The loss takes the targets sparse (the 5 nearest bins and their weights); against
    -sum_q Z_q log p_q over the targets written out, pixel by pixel."""
    torch.manual_seed(0)
    bins = sb.ab_bins()
    logits = torch.randn(2, len(bins), 3, 3)
    ab = (torch.rand(2, 2, 3, 3) - 0.5) * 150
    near, Z = sb.soft_targets(ab, bins, sigma=5.0, table=sb.bin_table(bins))
    target = sb.soft_encode(ab, bins, sigma=5.0)
    total = 0.0
    for n in range(2):
        for i in range(3):
            for j in range(3):
                p = torch.softmax(logits[n, :, i, j], 0)
                total += -(target[n, :, i, j] * p.log()).sum()
    assert torch.allclose(sb.soft_cross_entropy(logits, near, Z), total / 18)


def test_end_to_end_and_regression(tiny_folder, tmp_path):
    sb.main(tiny(tiny_folder, tmp_path, "--epochs", "2"))
    saved = json.loads((tmp_path / "eval.json").read_text())
    for key in ("knn_top1", "linear_top1", "random_knn_top1", "random_linear_top1"):
        assert 0.0 <= saved[key] <= 1.0
    assert (tmp_path / "grid.png").is_file()
    encoder = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert any(k.startswith("f1.") for k in encoder) and any(k.startswith("f2.") for k in encoder)
    sb.main(tiny(tiny_folder, tmp_path / "reg", "--max-steps", "2", "--loss", "regression", "--halves", "half",
                 "--no-turn-hues", "--no-eval"))


def test_a_short_run_beats_constant_guesses(tmp_path):
    """After 300 steps each half's cross-entropy on the test split is below the best
    constant guess's (the targets' mean distribution), and the baselines are what they say
    (measured: F1 4.26 against 4.50, F2 3.30 against 3.40)."""
    r = sb.main(["--out", str(tmp_path), "--max-steps", "300", "--no-eval", "--log-every", "0"])
    x = common.make_shapes(2000, 32, seed=1)[0].float() / 255  # the test split
    lab = torch.nn.functional.adaptive_avg_pool2d(common.rgb_to_lab(x), 8)
    constant_error = (lab[:, :1] - lab[:, :1].mean()).abs().mean().item()  # always guessing the mean lightness
    assert abs(r["pretext_L_error_mean_guess"] - constant_error) < 1e-3
    assert abs(r["pretext_ab_error_grey_guess"] - lab[:, 1:].abs().mean().item()) < 1e-3
    target = sb.soft_encode(lab[:, :1], sb.l_centres(50), sigma=1.0)  # F2's targets
    p = target.mean((0, 2, 3))
    assert r["pretext_L_xent_constant"] == pytest.approx(-(p * p.clamp(min=1e-12).log()).sum().item(), rel=1e-4)
    assert r["pretext_L_xent"] < r["pretext_L_xent_constant"] - 0.05
    assert r["pretext_ab_xent"] < r["pretext_ab_xent_constant"] - 0.05


def test_two_process_torchrun(tiny_folder, tmp_path):
    proc = torchrun("split_brain.py", *tiny(tiny_folder, tmp_path, "--max-steps", "3", "--no-eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert differences_between_processes(tmp_path) == []


def test_bad_halves_is_one_line(tmp_path):
    with pytest.raises(common.RunError) as e:
        sb.main(["--halves", "quarter", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--halves must be full or half" in str(e.value)


def test_turning_hues_moves_every_hue_of_an_image_by_one_angle():
    torch.manual_seed(0)
    lab = torch.cat([torch.rand(3, 1, 4, 4) * 100, (torch.rand(3, 2, 4, 4) - 0.5) * 160], dim=1)
    turned = sb.turn_hues(lab)
    assert torch.equal(turned[:, 0], lab[:, 0])  # lightness untouched
    assert torch.allclose(turned[:, 1:].norm(dim=1), lab[:, 1:].norm(dim=1), atol=1e-3)  # chroma kept
    shift = torch.atan2(turned[:, 2], turned[:, 1]) - torch.atan2(lab[:, 2], lab[:, 1])
    shift = torch.remainder(shift, 2 * torch.pi)  # (3, 4, 4): one angle per image
    spread = torch.remainder(shift - shift[:, :1, :1] + torch.pi, 2 * torch.pi) - torch.pi
    assert spread.abs().max() < 1e-3
    assert (shift[:, 0, 0] - shift[0, 0, 0]).abs()[1:].min() > 1e-2  # images turn by different angles

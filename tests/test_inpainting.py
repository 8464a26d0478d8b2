"""inpainting.py: masks, the reconstruction loss, the model's shapes, and the script."""
import json

import pytest
import torch
import torch.nn.functional as F

import common
import inpainting
from conftest import differences_between_processes, torchrun
from test_rotation import run_script, tiny


def test_reconstruction_loss_is_the_mean_square_inside_the_mask_only():
    torch.manual_seed(0)
    x, x_hat = torch.rand(2, 3, 6, 6), torch.rand(2, 3, 6, 6)
    m = torch.zeros(2, 1, 6, 6)
    m[0, :, 1:3, 2:5] = 1
    m[1, :, 4, 0] = 1
    total, count = 0.0, 0
    for n in range(2):  # a plain loop over the masked values
        for c in range(3):
            for i in range(6):
                for j in range(6):
                    if m[n, 0, i, j]:
                        total += float(x[n, c, i, j] - x_hat[n, c, i, j]) ** 2
                        count += 1
    loss = inpainting.reconstruction_loss(x, x_hat, m)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    changed = torch.where(m.bool().expand_as(x), x_hat, torch.rand_like(x_hat))  # new values outside M only
    assert inpainting.reconstruction_loss(x, changed, m).item() == pytest.approx(loss.item(), rel=1e-6)


def test_with_the_context_weighted_the_loss_covers_the_whole_output():
    """Random holes as the released code trains them: the squared error over the whole
    output, the context's weighted by context_weight beside 1 in the hole."""
    torch.manual_seed(0)
    x, x_hat = torch.rand(2, 3, 6, 6), torch.rand(2, 3, 6, 6)
    m = (torch.rand(2, 1, 6, 6) < 0.3).float()
    assert inpainting.reconstruction_loss(x, x_hat, m, 1.0).item() == pytest.approx(F.mse_loss(x_hat, x).item(),
                                                                                     rel=1e-5)
    total = weight = 0.0
    for n in range(2):
        for c in range(3):
            for i in range(6):
                for j in range(6):
                    w = 1.0 if m[n, 0, i, j] else 0.25
                    total += w * float(x[n, c, i, j] - x_hat[n, c, i, j]) ** 2
                    weight += w
    assert inpainting.reconstruction_loss(x, x_hat, m, 0.25).item() == pytest.approx(total / weight, rel=1e-5)
    assert inpainting.reconstruction_loss(x, x_hat, m, 0.0).item() == pytest.approx(
        inpainting.reconstruction_loss(x, x_hat, m).item())


def test_central_mask_has_the_requested_size_and_place():
    m = inpainting.make_masks(3, 32, "center", 0.5)
    assert m.shape == (3, 1, 32, 32)
    assert m[:, 0, 8:24, 8:24].eq(1).all() and m.sum() == 3 * 16 * 16
    m = inpainting.make_masks(1, 30, "center", 0.3)
    rows = m[0, 0].sum(1).nonzero().flatten()
    assert len(rows) == 9 and rows[0] == (30 - 9) // 2


def test_block_and_region_masks():
    torch.manual_seed(0)
    blocks = inpainting.make_masks(200, 32, "blocks", 0.5)
    area = blocks.sum((1, 2, 3))
    assert (area >= 64).all() and (area <= 4 * 64).all()  # four 8 x 8 blocks, possibly overlapping
    region = inpainting.make_masks(50, 32, "region", 0.5)
    assert ((region.mean((1, 2, 3)) - 0.25).abs() < 0.02).all()
    assert not torch.equal(region[0], region[1])


def test_masked_image_keeps_the_context_and_fills_the_hole_with_the_mean():
    x = torch.rand(2, 3, 8, 8)
    m = inpainting.make_masks(2, 8, "center", 0.5)
    out = inpainting.mask_images(x, m)
    keep = ~m.bool().expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert torch.allclose(out[0, :, 3, 3], torch.tensor(common.MEAN))


@pytest.mark.parametrize("backbone, size", [("small", 32), ("small", 64), ("resnet18", 32)])
def test_context_encoder_restores_the_full_image_size(backbone, size):
    net, width = common.build_backbone(backbone, size)
    model = inpainting.ContextEncoder(net, width, size)
    out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, 3, size, size) and out.min() >= 0 and out.max() <= 1


def test_end_to_end_writes_eval_json_and_the_grid(tiny_folder, tmp_path):
    inpainting.main(tiny(tiny_folder, tmp_path, "--epochs", "2"))
    saved = json.loads((tmp_path / "eval.json").read_text())
    for key in ("knn_top1", "linear_top1", "random_knn_top1", "random_linear_top1"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["pretext_hole_mse"] > 0
    from PIL import Image
    with Image.open(tmp_path / "grid.png") as im:  # three rows of 8 images of 32 px
        assert im.size == (8 * 33 + 1, 3 * 33 + 1)


def test_a_short_run_fills_holes_better_than_the_mean_colour(tmp_path):
    r = inpainting.main(["--out", str(tmp_path), "--max-steps", "60", "--no-eval", "--log-every", "0",
                         "--adv-weight", "0", "--mask", "center"])
    x = torch.stack([img for img, _ in common.TensorImages(*common.make_shapes(500, 32, seed=1))]).float() / 255
    m = inpainting.make_masks(len(x), 32, "center", 0.5)
    baseline = inpainting.reconstruction_loss(x, inpainting.mask_images(x, m), m).item()
    assert r["pretext_hole_mse"] < 0.8 * baseline


def test_bad_mask_is_one_line(tmp_path):
    proc = run_script("inpainting.py", "--mask", "star", "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --mask must be center, blocks or region, not star"


def test_two_process_torchrun(tiny_folder, tmp_path):
    proc = torchrun("inpainting.py", *tiny(tiny_folder, tmp_path, "--max-steps", "3", "--no-eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert differences_between_processes(tmp_path) == []


def test_hole_sharpness_counts_edges_inside_the_hole_only():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    m = torch.zeros(2, 1, 16, 16)
    m[..., 4:12, 4:12] = 1
    fill, true = inpainting.hole_sharpness(x, x, m)
    assert fill == pytest.approx(true) and true > 0
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1)
    fill, true = inpainting.hole_sharpness(x, blurred, m)
    assert fill < 0.6 * true  # a blurry fill has weaker edges
    outside = x.clone()
    outside[..., :3, :] = torch.rand(2, 3, 3, 16)  # changes outside the hole do not count
    assert inpainting.hole_sharpness(x, outside, m)[0] == pytest.approx(true)
    # By hand: a hole of two pixels side by side, values 0 and 1 -> one edge of size 1 per channel.
    x = torch.zeros(1, 3, 4, 4)
    x[..., 1, 2] = 1
    m = torch.zeros(1, 1, 4, 4)
    m[..., 1, 1:3] = 1
    assert inpainting.hole_sharpness(x, x, m) == (3.0, 3.0)


def test_the_discriminator_judges_the_predicted_hole_or_the_raw_output():
    """Paper sec. 3.2: with the central mask D sees the hole region only (real centres
    against predicted centres); with random masks, the whole image: the raw output."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    m = inpainting.make_masks(2, 32, "center", 0.5)
    view = inpainting.disc_view(x, "center", 0.5)
    assert view.shape == (2, 3, 16, 16)
    assert torch.equal(view, x[m.expand_as(x).bool()].view(2, 3, 16, 16))  # exactly the dropped pixels
    for kind in ("blocks", "region"):
        assert inpainting.disc_view(x, kind, 0.5) is x
    assert inpainting.Discriminator()(view).shape == (2,)  # D takes the smaller view

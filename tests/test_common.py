"""Unit tests of the shared plumbing: config, colour space, data, backbones, evaluation."""
import pytest
import torch
import torch.nn as nn

import common


# -- config -------------------------------------------------------------------
def test_help_shows_every_shared_option_with_its_comment_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_args(common.Args, ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--data-dir", "--image-size", "--backbone", "--epochs", "--batch-size", "--lr",
                 "--workers", "--device", "--seed", "--amp", "--out", "--resume", "--max-steps"):
        assert flag in text
    assert "stop after this many optimiser steps" in text
    assert "(default: shapes)" in text


def test_parse_args_types_and_booleans():
    args = common.parse_args(common.Args, ["--epochs", "3", "--lr", "0.5", "--no-amp", "--out", "x"])
    assert (args.epochs, args.lr, args.amp, args.out) == (3, 0.5, False, "x")
    assert isinstance(args.lr, float) and isinstance(args.epochs, int)


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--backbone", "vgg"], "unknown backbone 'vgg'"),
    (["--epochs", "two"], "--epochs"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_options_raise_a_run_error_with_one_line_and_code_2(argv, needle):
    with pytest.raises(common.RunError) as e:
        common.parse_args(common.Args, argv)
    assert e.value.code == 2
    assert str(e.value).count("\n") == 0 and needle in str(e.value)


def test_cli_turns_a_run_error_into_one_line_and_its_exit_code(capsys):
    def main():
        common.fail("something is off", code=1)
    with pytest.raises(SystemExit) as e:
        common.cli(main)
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: something is off\n"


# -- colour space -------------------------------------------------------------
# Reference Lab values (D65, sRGB), as tabulated e.g. by Bruce Lindbloom's calculator.
KNOWN_LAB = [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ((0.5, 0.5, 0.5), (53.3890, 0.0, 0.0)),
]


@pytest.mark.parametrize("rgb, lab", KNOWN_LAB)
def test_rgb_to_lab_known_values(rgb, lab):
    out = common.rgb_to_lab(torch.tensor(rgb).view(1, 3, 1, 1)).flatten()
    assert torch.allclose(out, torch.tensor(lab), atol=0.01), out


def test_lab_round_trip_and_gradients():
    torch.manual_seed(0)
    rgb = torch.rand(4, 3, 8, 8)
    rgb[0, :, 0, 0] = 0.0  # the black corner, where pow's gradient would blow up
    rgb[0, :, 0, 1] = 1.0
    back = common.lab_to_rgb(common.rgb_to_lab(rgb))
    assert (back - rgb).abs().max() < 1e-3
    x = rgb.clone().requires_grad_()
    common.rgb_to_lab(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    lab = common.rgb_to_lab(rgb).requires_grad_()
    common.lab_to_rgb(lab).sum().backward()
    assert torch.isfinite(lab.grad).all()


# -- built-in images ------------------------------------------------------------
def test_shapes_are_deterministic_balanced_and_sized():
    a, la = common.make_shapes(60, 32, seed=3)
    b, lb = common.make_shapes(60, 32, seed=3)
    c, _ = common.make_shapes(60, 32, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == (60, 3, 32, 32)
    assert la.bincount(minlength=10).tolist() == [6] * 10
    for size in (48, 128):
        x, _ = common.make_shapes(10, size, seed=0)
        assert x.shape == (10, 3, size, size)


def test_shapes_have_an_up_and_varied_instances():
    x, y = common.make_shapes(1000, 32, seed=0)
    mean = x.float().mean(0) / 255  # (3, 32, 32)
    # Sky above, ground below: the average image is far from its upside-down copy...
    vertical = (mean - mean.flip(1)).abs().mean()
    horizontal = (mean - mean.flip(2)).abs().mean()
    assert vertical > 0.04 and vertical > 5 * horizontal
    # ...and blue dominates the top rows more than the bottom rows.
    blue_excess = mean[2] - mean[:2].mean(0)
    assert blue_excess[:6].mean() > blue_excess[-6:].mean() + 0.05
    # No two instances of a class are the same image.
    for k in range(10):
        imgs = x[y == k].flatten(1).float()
        assert torch.cdist(imgs[:20], imgs[:20]).fill_diagonal_(float("inf")).min() > 0


def test_shape_classes_differ_in_shape_not_only_colour():
    """A nearest-class-mean classifier on the mean colour of an image does poorly,
    so the probes measure what an encoder learned beyond colour."""
    xtr, ytr = common.make_shapes(2000, 32, seed=0)
    xte, yte = common.make_shapes(500, 32, seed=1)
    ftr, fte = xtr.float().mean((2, 3)), xte.float().mean((2, 3))
    means = torch.stack([ftr[ytr == k].mean(0) for k in range(10)])
    acc = (torch.cdist(fte, means).argmin(1) == yte).float().mean().item()
    assert acc < 0.4


def test_a_pixels_colour_does_not_give_its_lightness_away():
    """Colour (ab) and lightness (L) are drawn apart: on the built-in images the mean L of a
    pixel's ab bin explains a fifth of L's variance (measured 0.21; photos of CIFAR-10: 0.06),
    where RGB palettes gave 0.42, and L says almost nothing about ab (as in photos)."""
    import builtin_data
    keys = torch.arange(1000) % 10
    assert builtin_data.explained(keys.float() * 3, keys[:, None]) == pytest.approx(1.0)  # the key is the value
    assert abs(builtin_data.explained(torch.randn(1000), keys[:, None])) < 0.03  # the key is noise
    L_from_ab, ab_from_L = builtin_data.colour_shortcut(common.make_shapes(1000, 32, seed=0)[0])
    assert L_from_ab < 0.3 and ab_from_L < 0.1


# -- built-in videos ------------------------------------------------------------
def test_videos_are_deterministic_with_moving_objects_of_constant_colour():
    v1, m1 = common.make_videos(6, 10, 48, seed=5)
    v2, m2 = common.make_videos(6, 10, 48, seed=5)
    assert torch.equal(v1, v2) and torch.equal(m1, m2)
    assert v1.shape == (6, 10, 3, 48, 48) and m1.shape == (6, 10, 48, 48)
    assert set(m1.unique().tolist()) <= {0, 1, 2, 3} and {1, 2} <= set(m1.unique().tolist())
    moved = occluded = 0
    for i in range(6):
        for obj in m1[i].unique().tolist():
            if obj == 0:
                continue
            inside = m1[i] == obj  # (T, H, W)
            area = inside.flatten(1).sum(1)
            frames = (area > 20).nonzero().flatten()
            colours = torch.stack([v1[i, t].float().permute(1, 2, 0)[inside[t]].mean(0) for t in frames])
            # The colour of an object does not drift: its mean stays within a few levels.
            assert (colours - colours.mean(0)).abs().max() < 25
            ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
            cy = torch.stack([ys[inside[t]].mean() for t in frames])
            cx = torch.stack([xs[inside[t]].mean() for t in frames])
            moved += int(((cy - cy[0]) ** 2 + (cx - cx[0]) ** 2).sqrt().max() > 2)
            occluded += int(area.min() < 0.7 * area.max())
    assert moved >= 6 and occluded >= 1


# -- real data ------------------------------------------------------------------
def _args(**kw):
    return common.Args(**{"workers": 0, **kw})


def test_image_folder_with_train_and_test(tiny_folder):
    data = common.load_image_data(_args(dataset="folder", data_dir=str(tiny_folder), image_size=40))
    assert len(data.train) == 160 and len(data.test) == 60 and data.num_classes == 10
    x, y = data.train[0]
    assert x.shape == (3, 40, 40) and x.dtype == torch.uint8 and 0 <= int(y) < 10
    assert data.classes == tuple(sorted(common.SHAPE_CLASSES))


def test_single_image_folder_is_split_by_a_seed_and_bad_files_are_skipped(tmp_path, capsys):
    import torchvision.utils as vutils
    images, labels = common.make_shapes(40, 32, seed=0)
    for i, (x, y) in enumerate(zip(images, labels)):
        d = tmp_path / f"class{int(y) % 2}"
        d.mkdir(exist_ok=True)
        vutils.save_image(x.float() / 255, d / f"{i}.png")
    (tmp_path / "class0" / "broken.jpg").write_bytes(b"not an image")
    data = common.load_image_data(_args(dataset="folder", data_dir=str(tmp_path), image_size=32))
    assert len(data.train) + len(data.test) == 40 and len(data.test) == 4  # 41 files, the broken one skipped
    assert "broken.jpg" in capsys.readouterr().out
    again = common.load_image_data(_args(dataset="folder", data_dir=str(tmp_path), image_size=32))
    assert torch.equal(data.test.images, again.test.images)


def test_missing_torchvision_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(common.RunError) as e:
        common.load_image_data(_args(dataset="cifar10", data_dir=str(tmp_path)))
    assert e.value.code == 2 and "--download" in str(e.value)


def test_davis_2016_and_2017_masks_load_as_object_ids(tmp_path):
    from PIL import Image
    ids = torch.zeros(2, 20, 30, dtype=torch.uint8)
    ids[:, 2:8, 3:9], ids[:, 10:15, 12:20] = 1, 2
    for name, to_png in (("grey", lambda m: Image.fromarray(((m > 0) * 255).numpy().astype("uint8"), "L")),
                         ("palette", lambda m: _palette(m))):
        frames = tmp_path / "JPEGImages/480p" / name
        masks = tmp_path / "Annotations/480p" / name
        frames.mkdir(parents=True)
        masks.mkdir(parents=True)
        for t in range(2):
            Image.new("RGB", (30, 20), (t * 40, 80, 120)).save(frames / f"{t:05d}.jpg")
            to_png(ids[t]).save(masks / f"{t:05d}.png")
    videos = common.load_davis(tmp_path)
    grey_frames, grey_masks = videos["grey"]
    assert grey_frames.shape == (2, 3, 20, 30) and torch.equal(grey_masks, (ids > 0).to(torch.uint8))
    assert torch.equal(videos["palette"][1], ids)
    small = common.load_davis(tmp_path, size=10, videos=["palette"])["palette"]
    assert small[0].shape == (2, 3, 10, 15) and set(small[1].unique().tolist()) == {0, 1, 2}


def _palette(m):
    from PIL import Image
    im = Image.fromarray(m.numpy().astype("uint8"), "P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 - 3) * 3)
    return im


# -- augmentation ---------------------------------------------------------------
def test_random_crop_flip_returns_a_crop_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    out = common.random_crop_flip(x, pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(6):
        crops = [c for oy in range(5) for ox in range(5) for c in
                 (padded[i, :, oy:oy + 8, ox:ox + 8], padded[i, :, oy:oy + 8, ox:ox + 8].flip(-1))]
        assert any(torch.equal(out[i], c) for c in crops)


def test_cosine_lr_warms_up_then_decays_to_zero():
    assert common.cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert common.cosine_lr(9, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert common.cosine_lr(55, 100, 1.0, warmup=10) == pytest.approx(0.5)
    assert common.cosine_lr(100, 100, 1.0, warmup=10) == pytest.approx(0.0)


# -- backbones ------------------------------------------------------------------
@pytest.mark.parametrize("name, size, width", [("small", 32, 128), ("resnet18", 32, 512), ("resnet50", 32, 2048),
                                               ("resnet18", 96, 512)])
def test_backbones_map_images_to_feature_vectors(name, size, width):
    net, w = common.build_backbone(name, size)
    assert w == width
    assert net(torch.rand(2, 3, size, size)).shape == (2, width)


@pytest.mark.parametrize("name, size", [("resnet18", 32), ("resnet50", 96)])
def test_saved_encoder_loads_into_torchvision_missing_only_fc(name, size):
    import torchvision
    net, _ = common.build_backbone(name, size)
    tv = getattr(torchvision.models, name)(weights=None)
    if size <= 64:  # the CIFAR stem, as the README shows
        tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        tv.maxpool = nn.Identity()
    missing, unexpected = tv.load_state_dict(net.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


# -- evaluation -----------------------------------------------------------------
def test_knn_is_weighted_by_similarity():
    """One close neighbour of class 0 outvotes two farther ones of class 1 at t = 0.1
    (weights e^10 vs 2 e^8), where an unweighted majority would pick class 1."""
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[2.0, 0.0]])  # normalised to (1, 0): similarities 1.0, 0.8, 0.8
    assert common.knn_accuracy(train, labels, test, torch.tensor([0]), k=3, temperature=0.1) == 1.0
    assert common.knn_accuracy(train, labels, test, torch.tensor([0]), k=3, temperature=10.0) == 0.0


def test_knn_and_linear_probe_on_toy_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=gen) * 3
    ytr, yte = torch.arange(500) % 5, torch.arange(200) % 5
    ftr = centres[ytr] + torch.randn(500, 16, generator=gen)
    fte = centres[yte] + torch.randn(200, 16, generator=gen)
    assert common.knn_accuracy(ftr, ytr, fte, yte) > 0.95
    assert common.linear_probe(ftr, ytr, fte, yte, epochs=30) > 0.95
    shuffled = ytr[torch.randperm(500, generator=gen)]  # labels unrelated to the features
    assert common.linear_probe(ftr, shuffled, fte, yte, epochs=30) < 0.4


def test_linear_probe_finds_a_direction_knn_cannot():
    """Class given by the sign of one small-scale feature beside 30 larger noisy ones:
    linearly separable (the probe standardises features), but cosine neighbours are
    dominated by the noise dimensions."""
    gen = torch.Generator().manual_seed(1)
    ftr, fte = torch.randn(1000, 31, generator=gen), torch.randn(300, 31, generator=gen)
    ftr[:, 0] *= 0.05
    fte[:, 0] *= 0.05
    ytr, yte = (ftr[:, 0] > 0).long(), (fte[:, 0] > 0).long()
    assert common.linear_probe(ftr, ytr, fte, yte, epochs=50) > 0.9
    assert common.knn_accuracy(ftr, ytr, fte, yte) < 0.65


def test_select_is_torch_where_bit_for_bit():
    torch.manual_seed(0)
    a, b = torch.randn(64, 3, 8, 8), torch.randn(64, 3, 8, 8)
    b[0] = 0.0
    for cond in (a > b, torch.rand(64, 1, 1, 1) < 0.5, torch.rand(64, 3, 8, 8) < 0.1):
        assert torch.equal(common.select(cond, a, b), torch.where(cond, a, b))
    assert torch.equal(common.select(a > 0, a, a.flip(-1)), torch.where(a > 0, a, a.flip(-1)))


def test_colour_jitter_is_torchvisions_adjustments_in_order():
    """Brightness, contrast, saturation, hue by the same factors, image by image, as
    torchvision's functional adjust_* (the plainly written reference): in that order, and
    in each image's own order, as ColorJitter draws one per image."""
    import torchvision.transforms.v2.functional as TF
    torch.manual_seed(0)
    x = torch.rand(12, 3, 12, 12)
    x[1, 0] = x[1, 1]  # ties between channels: red and green, green and blue, red and blue
    x[3, 1] = x[3, 2]
    x[4, 0] = x[4, 2]
    x[2] = 0.5  # grey
    x[5, :, :6] = 0.0  # black
    b, c, s = (torch.empty(12, 1, 1, 1).uniform_(0.6, 1.4) for _ in range(3))
    # the demo's hue 0.1 and v1's 0.4: shifts across sector boundaries and around the circle
    shift = torch.cat([torch.empty(6, 1, 1).uniform_(-0.1, 0.1), torch.empty(6, 1, 1).uniform_(-0.5, 0.5)])
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    orders = torch.stack([torch.randperm(4) for _ in range(12)])
    assert len({tuple(o) for o in orders.tolist()}) > 6
    for order in (None, orders):
        out = common.jitter_colours(x, b, c, s, shift, order)
        for i in range(12):
            y = x[i]
            for j in (range(4) if order is None else order[i].tolist()):
                y = adjust[j](y, float((b, c, s, shift)[j][i]))
            assert (out[i] - y).abs().max() < 1e-4, i  # grey: ITU-R 601's 0.299 red, torchvision's 0.2989
    assert not torch.allclose(common.jitter_colours(x, b, c, s, shift, orders), common.jitter_colours(x, b, c, s, shift))
    # p: which images are jittered at all; the rest are returned as they came
    torch.manual_seed(1)
    kept = common.color_jitter(x, p=0.0)
    assert torch.equal(kept, x)


def test_the_quick_starts_encoder_loads_into_small_resnet_as_the_readme_shows():
    net, width = common.build_backbone("small", 32)
    fresh = common.SmallResNet()
    fresh.load_state_dict(net.state_dict())  # strict: the README's first snippet
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(common.Normalize()(x)), net.eval()(common.Normalize()(x)))
    assert width == 128

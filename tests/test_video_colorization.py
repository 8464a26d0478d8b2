"""video_colorization.py: the pointer, mask propagation, J, and the script as a user runs it."""
import json

import pytest
import torch
import torch.nn.functional as F

import common
import video_colorization as vc
from conftest import differences_between_processes, torchrun
from test_rotation import run_script


# -- the pointer ------------------------------------------------------------------
def test_copy_colors_matches_the_lectures_formula_written_as_loops():
    torch.manual_seed(0)
    b, n_ref, n_tgt, e, d = 2, 5, 3, 4, 6
    f_ref, f_tgt, c_ref = torch.randn(b, n_ref, e), torch.randn(b, n_tgt, e), torch.rand(b, n_ref, d)
    y = vc.copy_colors(f_ref, f_tgt, c_ref, temperature=0.7)
    assert y.shape == (b, n_tgt, d)
    for s in range(b):
        for j in range(n_tgt):
            scores = [float(f_ref[s, i] @ f_tgt[s, j]) / 0.7 for i in range(n_ref)]
            weights = [torch.tensor(v).exp() / sum(torch.tensor(u).exp() for u in scores) for v in scores]
            expected = sum(weights[i] * c_ref[s, i] for i in range(n_ref))
            assert torch.allclose(y[s, j], expected, atol=1e-5)


def test_identical_one_hot_embeddings_copy_exactly():
    n = 7
    f = torch.eye(n).unsqueeze(0)  # location i has embedding e_i, in both frames
    c_ref = torch.rand(1, n, 3)
    y = vc.copy_colors(f, f, c_ref, temperature=0.01)  # exp(-100) of the others: nothing leaks
    assert torch.allclose(y, c_ref, atol=1e-12)
    # A target shown in a shuffled order picks the same colours, shuffled.
    order = torch.randperm(n)
    assert torch.allclose(vc.copy_colors(f, f[:, order], c_ref, 0.01), c_ref[:, order], atol=1e-12)


def test_weights_over_the_reference_locations_sum_to_one():
    torch.manual_seed(1)
    f_ref, f_tgt = torch.randn(3, 40, 8) * 5, torch.randn(3, 25, 8) * 5
    y = vc.copy_colors(f_ref, f_tgt, torch.ones(3, 40, 1), temperature=0.3)  # sum_i A_ij * 1
    assert torch.allclose(y, torch.ones(3, 25, 1), atol=1e-5)
    # A copied one-hot colour is a distribution over the clusters.
    ids = torch.randint(16, (3, 40))
    y = vc.copy_colors(f_ref, f_tgt, F.one_hot(ids, 16).float())
    assert torch.allclose(y.sum(-1), torch.ones(3, 25), atol=1e-5) and (y >= 0).all()


def test_kmeans_finds_separated_clusters_and_quantise_picks_the_nearest():
    gen = torch.Generator().manual_seed(0)
    true = torch.tensor([[-40.0, 0.0], [0.0, 30.0], [35.0, -20.0]])
    points = torch.cat([c + torch.randn(200, 2, generator=gen) for c in true])
    centres = vc.kmeans(points, 3, seed=0)
    assert torch.allclose(centres[centres[:, 0].argsort()], true[true[:, 0].argsort()], atol=0.5)
    ab = torch.tensor([[-39.0, 1.0], [36.0, -19.0]]).T.reshape(1, 2, 1, 2)
    ids = vc.quantise(ab, centres)
    assert ids.shape == (1, 1, 2)
    assert torch.equal(centres[ids.flatten()].round(), torch.tensor([[-40.0, 0.0], [35.0, -20.0]]))


# -- tracking -----------------------------------------------------------------------
def test_region_similarity_worked_by_hand():
    gt = torch.zeros(3, 4, 4, dtype=torch.long)
    gt[:, :2, :2] = 1  # object 1: 4 pixels in every frame
    gt[0, 3, 3] = 2  # object 2: in frame 0 only, then gone
    pred = gt.clone()
    pred[1, :2, 2:] = 1  # frame 1: 8 predicted pixels, 4 right: IoU 1/2
    pred[2, 3, 3] = 2  # frame 2: object 2 predicted where there is none: IoU 0
    assert vc.region_similarity(pred, gt) == pytest.approx([(0.5 + 1.0) / 2, (1.0 + 0.0) / 2])


def _moving_square(frames=20, size=32, side=8):
    masks = torch.zeros(frames, size, size, dtype=torch.long)
    for t in range(frames):
        masks[t, 6 + t // 2:6 + t // 2 + side, 2 + t:2 + t + side] = 1  # right 1 px, down 1/2 px a frame
    return masks


def test_a_moving_square_is_tracked_with_embeddings_of_colour_and_position():
    masks = _moving_square()
    t, size = masks.shape[0], masks.shape[-1]
    colour = torch.where(masks == 1, 1.0, -1.0)  # the square is red, the background grey: +-1 on one axis
    # Position: Gaussian bumps on a 4x4 grid of centres, so nearby locations have large dot products.
    coords = torch.arange(size).float()
    centres = torch.linspace(0, size - 1, 4)
    bumps = torch.exp(-(coords.view(-1, 1) - centres.view(1, -1)) ** 2 / (2 * 6.0 ** 2))  # (size, 4)
    position = (bumps.view(size, 1, 4, 1) * bumps.view(1, size, 1, 4)).reshape(size, size, 16).permute(2, 0, 1)
    feats = torch.cat([3 * colour.unsqueeze(1), position.expand(t, -1, -1, -1)], 1)  # (T, 17, H, W)
    pred = vc.propagate_masks(feats, masks[0], window=3, temperature=0.1)
    assert pred.shape == masks.shape and torch.equal(pred[0], masks[0])
    assert vc.region_similarity(pred, masks)[0] > 0.99
    copied = vc.region_similarity(masks[:1].expand_as(masks), masks)[0]
    assert copied < 0.4  # copying the first mask loses the square as it moves away
    # On maps 2x coarser than the frames (as a network's are) the labels blur at the
    # square's edges, but it is still followed to the last frame.
    pred = vc.propagate_masks(F.avg_pool2d(feats, 2), masks[0], window=3, temperature=0.1)
    assert vc.region_similarity(pred, masks)[0] > 0.75
    assert ((pred[-1] == 1) & (masks[-1] == 1)).sum() > 0.5 * masks[-1].sum()


def test_propagation_handles_several_objects_and_respects_the_radius():
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[0, :, :4], masks[0, :, 4:] = 1, 2  # two objects side by side
    masks[1] = masks[0]
    feats = torch.zeros(2, 1, 8, 8)
    feats[0, 0, :, 0] = 1.0  # in frame 0, only column 0 (object 1) looks like anything in frame 1
    feats[1, 0] = 1.0
    free = vc.propagate_masks(feats, masks[0], window=0, temperature=0.01, topk=8)
    assert (free[1] == 1).all()  # every location points at column 0
    local = vc.propagate_masks(feats, masks[0], window=0, temperature=0.01, radius=1)
    assert (local[1, :, :2] == 1).all() and (local[1, :, 4:] == 2).all()  # too far from column 0 to copy it


# -- the script -------------------------------------------------------------------------
def tiny(out, *extra):
    return ["--train-videos", "8", "--eval-videos", "2", "--strip-videos", "2", "--batch-size", "8",
            "--out", str(out), "--log-every", "0", *extra]


def test_end_to_end_on_the_built_in_videos(tmp_path):
    results = vc.main(tiny(tmp_path, "--max-steps", "3"))
    for name in ("config.json", "log.jsonl", "checkpoint.pt", "encoder.pt", "embedder.pt", "eval.json",
                 "strip.png", "colour_clusters.pt"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "eval.json").read_text())
    for key in ("J", "J_random_init", "J_copy_first", "pretext_top1"):
        assert 0.0 <= saved[key] <= 1.0 and saved[key] == results[key]
    assert saved["videos"] == 2 and saved["steps"] == 3
    assert torch.load(tmp_path / "colour_clusters.pt").shape == (16, 2)
    # The encoder is a plain backbone: dense() changes strides, not weights.
    backbone, _ = common.build_backbone("small", 64)
    backbone.load_state_dict(torch.load(tmp_path / "encoder.pt"))


def test_a_short_run_learns_to_copy_colours(tmp_path):
    vc.main(["--train-videos", "48", "--eval-videos", "4", "--batch-size", "16", "--epochs", "1",
             "--out", str(tmp_path), "--log-every", "0", "--lr", "2e-3"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(losses) >= 30
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


def _davis_folder(root, videos=("two", "one"), frames=12):
    from PIL import Image
    for v, name in enumerate(videos):
        (root / "JPEGImages/480p" / name).mkdir(parents=True)
        (root / "Annotations/480p" / name).mkdir(parents=True)
        for t in range(frames):
            img = torch.full((40, 60, 3), 90, dtype=torch.uint8)
            ids = torch.zeros(40, 60, dtype=torch.uint8)
            ids[10:22, 5 + 2 * t:17 + 2 * t] = 1
            if v == 0:
                ids[25:35, 40 - t:50 - t] = 2
            img[ids == 1] = torch.tensor([220, 40, 40], dtype=torch.uint8)
            img[ids == 2] = torch.tensor([40, 40, 220], dtype=torch.uint8)
            Image.fromarray(img.numpy()).save(root / "JPEGImages/480p" / name / f"{t:05d}.jpg")
            if v == 0:  # DAVIS-2017: palette PNG with object ids
                mask = Image.fromarray(ids.numpy(), "P")
                mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 253 * 3)
            else:  # DAVIS-2016: {0, 255}
                mask = Image.fromarray((ids * 255).numpy(), "L")
            mask.save(root / "Annotations/480p" / name / f"{t:05d}.png")
    return root


def test_davis_layout_end_to_end_with_both_mask_kinds(tmp_path):
    root = _davis_folder(tmp_path / "davis")
    results = vc.main(["--dataset", "davis", "--data-dir", str(root), "--image-size", "32",
                       "--batch-size", "4", "--max-steps", "2", "--out", str(tmp_path / "run"), "--log-every", "0"])
    assert results["videos"] == 2 and results["objects"] == 3  # two in the palette video, one in the {0,255} one
    assert set(results["J_per_video"]) == {"one", "two"}


def test_trained_on_some_videos_tracks_others(tmp_path):
    """--eval-dir: tracking scored on videos the network never trained on, after training
    on the built-in videos or on another DAVIS folder."""
    train, held_out = _davis_folder(tmp_path / "train", videos=("two",)), _davis_folder(tmp_path / "held", videos=("one",))
    for argv in (["--train-videos", "4"], ["--dataset", "davis", "--data-dir", str(train)]):
        results = vc.main([*argv, "--eval-dir", str(held_out), "--image-size", "32", "--batch-size", "4",
                           "--max-steps", "1", "--out", str(tmp_path / argv[1].replace("/", "_")), "--log-every", "0"])
        assert set(results["J_per_video"]) == {"one"} and results["objects"] == 2  # its two objects


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "davis", "--data-dir", "/nonexistent"], "is not a DAVIS folder"),
    (["--dataset", "kinetics"], "unknown dataset 'kinetics' (choose from shapes, davis)"),
    (["--crop", "8"], "--crop 8 is too small: 0 (whole frames) or at least 16 px"),
    (["--ref-frames", "20"], "no video has the 21 frames"),
    (["--image-size", "8"], "--image-size 8 is too small"),
])
def test_bad_input_is_one_line(tmp_path, argv, needle):
    proc = run_script("video_colorization.py", *argv, "--train-videos", "4", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_two_process_torchrun_on_cpu(tmp_path):
    proc = torchrun("video_colorization.py", *tiny(tmp_path, "--max-steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The colour centres among them: k-means ran on each process's own crops, rank 0's are kept.
    assert differences_between_processes(tmp_path) == []
    assert "2 process(es)" in proc.stdout and proc.stdout.count("video_colorization done") == 1
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_stopped_run_resumes_with_its_colour_clusters(tmp_path):
    vc.main(tiny(tmp_path, "--max-steps", "2", "--no-eval"))
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert first["step"] == 2 and first["centres"].shape == (16, 2)
    vc.main(tiny(tmp_path, "--max-steps", "4", "--no-eval", "--resume", str(tmp_path)))
    second = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert second["step"] == 4 and torch.equal(second["centres"], first["centres"])

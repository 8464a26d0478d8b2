"""What each method learned, seen: neighbours.png and the kNN learning curve."""
import json

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import rotation
from test_rotation import tiny


def test_nearest_neighbours_match_a_plainly_written_top_k():
    torch.manual_seed(0)
    train, queries = torch.randn(50, 6), torch.randn(4, 6)
    near = common.nearest_neighbours(train, queries, 7)
    for q in range(4):
        sims = [(float(F.cosine_similarity(queries[q], train[i], dim=0)), i) for i in range(50)]
        expected = [i for _, i in sorted(sims, reverse=True)[:7]]
        assert near[q].tolist() == expected


def test_query_images_are_fixed_and_spread_over_the_classes():
    labels = torch.tensor([3, 1, 1, 0, 2, 3, 0, 2, 1])
    assert common.query_images(labels, 4) == [3, 1, 4, 0]  # the first image of classes 0, 1, 2, 3
    assert common.query_images(labels, 6) == [3, 1, 4, 0, 6, 2]  # then the second of each, in class order


def _steps(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_draws_its_neighbours_and_logs_its_learning_curve(tiny_folder, tmp_path):
    out = tmp_path / "run"
    rotation.main(tiny(tiny_folder, out, "--epochs", "2", "--max-steps", "10", "--no-eval"))
    results = rotation.main(["--resume", str(out), "--eval"])
    curve = [r for r in _steps(out / "log.jsonl") if "knn_top1" in r]
    # Before training, after epoch 1, and on across the resume after epoch 2.
    assert [(r["epoch"], r["step"]) for r in curve] == [(0, 0), (1, 10), (2, 20)]
    # Both splits are smaller than the monitor's subsets, so its last point is the final kNN.
    assert abs(curve[-1]["knn_top1"] - results["knn_top1"]) < 1e-9
    with Image.open(out / "neighbours.png") as im:  # 2 blocks of 8 rows of 1 query + 7 neighbours, 36 px tiles
        assert im.size == (8 * 38 + 2, 16 * 38 + 2 + 6)


def test_the_monitor_spaces_itself_out_when_it_costs_too_much(tmp_path, capsys):
    args = common.parse_args(common.Args, ["--out", str(tmp_path), "--epochs", "4", "--batch-size", "4",
                                           "--log-every", "1000"])
    run = common.Run(args, "toy")
    images = common.TensorImages(torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8), torch.arange(8) % 2)
    data = common.ImageData(images, images, images, ("a", "b"))
    model = nn.Linear(2, 2)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    try:
        for _ in run.steps(run.loader(images), {"model": model}, monitor=(data, lambda: encoder)):
            run.log(4)  # an epoch of two steps that do nothing: any monitor is over 10% of that
    finally:
        run.close()
    curve = [r["epoch"] for r in _steps(tmp_path / "log.jsonl") if "knn_top1" in r]
    assert curve == [0, 1]  # before training, after epoch 1; the next would be past the end
    said = capsys.readouterr().out
    assert "epochs from now on, to stay under 10% of the time" in said

"""moco.py: logits, queue, momentum update, split BN, shuffling, and the script."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moco
from conftest import differences_between_processes, torchrun
from test_rotation import run_script, tiny


def _moco(K=8, dim=4, m=0.9):
    enc = moco.Encoder(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                       6, dim, mlp=False)
    return moco.MoCo(enc, dim, K, m, 0.1)


def test_l_pos_and_l_neg_are_dot_products():
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    queue = F.normalize(torch.randn(4, 5), dim=0)
    l_pos, l_neg = moco.contrastive_logits(q, k, queue)
    assert l_pos.shape == (3, 1) and l_neg.shape == (3, 5)
    for i in range(3):
        assert l_pos[i, 0].item() == pytest.approx(sum(q[i, c] * k[i, c] for c in range(4)).item(), abs=1e-6)
        for j in range(5):
            assert l_neg[i, j].item() == pytest.approx(sum(q[i, c] * queue[c, j] for c in range(4)).item(), abs=1e-6)


def test_queue_keeps_the_newest_keys_and_wraps_around():
    model = _moco(K=8, dim=4)
    assert torch.allclose(model.queue.norm(dim=0), torch.ones(8))  # random keys, normalised, to start
    batches = [F.normalize(torch.randn(2, 4), dim=1) for _ in range(5)]
    for b in batches:
        model.enqueue_dequeue(b)
    # 5 batches of 2 into 8 slots: the first batch was overwritten by the fifth.
    assert int(model.queue_ptr) == 2
    for slot, b in zip((0, 2, 4, 6), (batches[4], batches[1], batches[2], batches[3])):
        assert torch.equal(model.queue[:, slot:slot + 2], b.T)
    assert torch.allclose(model.queue.norm(dim=0), torch.ones(8))


def test_momentum_update_moves_parameters_only_and_leaves_f_k_buffers_alone():
    """theta_k <- m theta_k + (1 - m) theta_q over the parameters, as the official code;
    f_k's batch-norm statistics are its own: neither copied nor averaged from f_q's."""
    model = _moco(m=0.9)
    for p in model.f_q.parameters():
        p.data.add_(1.0)
    model.f_q.backbone[1].running_mean.fill_(3.0)
    model.f_k.backbone[1].running_mean.fill_(-2.0)
    model.f_k.backbone[1].num_batches_tracked.fill_(7)
    before_q = [p.detach().clone() for p in model.f_q.parameters()]
    before_k = [p.detach().clone() for p in model.f_k.parameters()]
    model.momentum_update()
    for pq, pk, after in zip(before_q, before_k, model.f_k.parameters()):
        assert torch.allclose(after, 0.9 * pk + 0.1 * pq)
    assert torch.equal(model.f_k.backbone[1].running_mean, torch.full((6,), -2.0))
    assert int(model.f_k.backbone[1].num_batches_tracked) == 7
    # f_k's statistics follow its own forward passes over the keys in training mode.
    model.f_k.train()
    with torch.no_grad():
        model.f_k(torch.rand(4, 3, 8, 8) + 5)
    assert (model.f_k.backbone[1].running_mean > -2.0).all()
    assert torch.equal(model.f_q.backbone[1].running_mean, torch.full((6,), 3.0))


def test_backward_leaves_f_k_untouched():
    model = _moco()
    before = [p.detach().clone() for p in model.f_k.parameters()]
    x = torch.rand(4, 3, 8, 8)
    q = F.normalize(model.f_q(x), dim=1)
    with torch.no_grad():
        k = F.normalize(model.f_k(x), dim=1)
    l_pos, l_neg = moco.contrastive_logits(q, k, model.queue)
    F.cross_entropy(torch.cat([l_pos, l_neg], 1) / 0.1, torch.zeros(4, dtype=torch.long)).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.f_k.parameters())
    assert all(p.grad is not None for p in model.f_q.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.f_k.parameters()))


def test_split_bn_equals_batch_norm_per_sub_batch():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    split = moco.use_split_bn(nn.Sequential(bn), 4)[0]
    assert isinstance(split, moco.SplitBatchNorm)
    x = torch.randn(16, 3, 5, 5) * 2 + 1
    out = split(x)
    for j in range(4):  # sub-batch j: images 4j to 4j + 3, as device j would hold them
        block = x[4 * j:4 * j + 4]
        mean, var = block.mean((0, 2, 3)), block.var((0, 2, 3), unbiased=False)
        reference = (block - mean.view(1, 3, 1, 1)) / (var.view(1, 3, 1, 1) + bn.eps).sqrt() \
            * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
        assert torch.allclose(out[4 * j:4 * j + 4], reference, atol=1e-5)
    blocks = x.view(4, 4, 3, 5, 5)
    expected_mean = 0.9 * 0 + 0.1 * blocks.mean((1, 3, 4)).mean(0)
    expected_var = 0.9 * 1 + 0.1 * blocks.var((1, 3, 4), unbiased=True).mean(0)  # running var: unbiased
    assert torch.allclose(split.running_mean, expected_mean, atol=1e-6)
    assert torch.allclose(split.running_var, expected_var, atol=1e-6)
    # channels_last in, channels_last out (blocks are views: no layout copies), same values.
    fresh = moco.use_split_bn(nn.Sequential(nn.BatchNorm2d(3)), 4)[0]
    fresh.load_state_dict(bn.state_dict())
    out_cl = fresh(x.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(out_cl, out, atol=1e-5)
    split.eval()
    assert torch.allclose(split(x), F.batch_norm(x, split.running_mean, split.running_var, bn.weight, bn.bias,
                                                 training=False, eps=bn.eps))


def test_single_process_shuffle_is_undone():
    torch.manual_seed(0)
    x = torch.arange(10.0).view(10, 1)
    shuffled, unshuffle = moco.shuffle_keys(x)
    assert not torch.equal(shuffled, x) and torch.equal(shuffled.sort(0).values, x)
    assert torch.equal(moco.unshuffle_keys(shuffled, unshuffle), x)


def test_end_to_end_writes_eval_json_and_the_queue(tiny_folder, tmp_path):
    moco.main(tiny(tiny_folder, tmp_path, "--epochs", "3", "--queue-size", "64"))
    saved = json.loads((tmp_path / "eval.json").read_text())
    for key in ("knn_top1", "linear_top1", "random_knn_top1", "random_linear_top1", "pretext_top1"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["loss_chance"] == pytest.approx(math.log(65))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["queue"].shape == (128, 64) and int(state["queue_ptr"]) == (30 * 16) % 64
    assert torch.allclose(state["queue"].norm(dim=0), torch.ones(64), atol=1e-5)


def test_memory_bank_refreshes_exactly_the_batch_it_saw(tiny_folder, tmp_path):
    """Wu et al. 2018: one stored feature per training image; after a step the rows of
    that step's images, and only those, move towards their queries, and stay unit vectors."""
    moco.main(tiny(tiny_folder, tmp_path, "--negatives", "memory-bank", "--queue-size", "64", "--max-steps", "1",
                   "--no-eval"))
    before = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["bank"]
    moco.main(["--resume", str(tmp_path), "--max-steps", "2"])
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["bank"]
    assert before.shape == (160, 128) and torch.allclose(after.norm(dim=1), torch.ones(160), atol=1e-5)
    changed = ((after - before).abs().amax(1) > 0).nonzero().flatten().tolist()
    order = torch.utils.data.distributed.DistributedSampler(range(160), num_replicas=1, rank=0, seed=0)
    order.set_epoch(0)
    assert changed == sorted(list(order)[16:32])  # the second batch of epoch 0, by dataset index


def test_end_to_end_negatives_are_the_batch(tiny_folder, tmp_path):
    r = moco.main(tiny(tiny_folder, tmp_path, "--negatives", "end-to-end", "--max-steps", "2", "--no-eval"))
    assert r["loss_chance"] == pytest.approx(math.log(16))  # K = batch - 1 negatives
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "queue" not in state and state["step"] == 2


def test_end_to_end_keys_pass_through_shuffled_bn(tiny_folder, tmp_path, monkeypatch):
    """Paper sec. 3.3: shuffled BN "in both our method and its end-to-end ablation
    counterpart". Every step shuffles the key batch before the encoder and puts the keys
    back in image order after it, with their gradient."""
    calls = []
    shuffle = moco.shuffle_keys

    def recording(x):
        shuffled, unshuffle = shuffle(x)
        calls.append((x.clone(), shuffled.clone(), unshuffle.clone()))
        return shuffled, unshuffle

    monkeypatch.setattr(moco, "shuffle_keys", recording)
    seen = []
    real_forward = moco.Encoder.forward
    monkeypatch.setattr(moco.Encoder, "forward", lambda self, x: seen.append(x.detach().clone()) or real_forward(self, x))
    moco.main(tiny(tiny_folder, tmp_path, "--negatives", "end-to-end", "--max-steps", "2", "--no-eval"))
    assert len(calls) == 2
    for x, shuffled, unshuffle in calls:
        assert not torch.equal(shuffled, x) and torch.equal(shuffled[unshuffle], x)
    keys_in = [s for s in seen if any(torch.equal(s, c[1]) for c in calls)]
    assert len(keys_in) == 2  # the encoder saw the shuffled key batches


def test_a_short_run_beats_random_init(tmp_path):
    """120 steps on the built-in shapes already beat the random-init encoder downstream
    (measured: kNN 0.199 vs 0.170, linear 0.279 vs 0.230)."""
    r = moco.main(["--out", str(tmp_path), "--max-steps", "120", "--batch-size", "128", "--queue-size", "1024",
                   "--log-every", "100"])
    assert r["knn_top1"] > r["random_knn_top1"] + 0.01
    assert r["linear_top1"] > r["random_linear_top1"] + 0.02


def test_moco_under_torchrun_two_processes(tiny_folder, tmp_path):
    """Both processes hold one f_k and one queue (DDP makes f_q equal, and only f_q). The
    queue (K = 4096) is longer than the keys of 3 steps, so its random start must agree too."""
    proc = torchrun("moco.py", *tiny(tiny_folder, tmp_path, "--max-steps", "3", "--no-eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert int(state["queue_ptr"]) == 3 * 32  # keys of both processes entered the queue
    assert differences_between_processes(tmp_path) == []


def test_the_memory_bank_is_one_bank_under_torchrun(tiny_folder, tmp_path):
    proc = torchrun("moco.py", *tiny(tiny_folder, tmp_path, "--negatives", "memory-bank", "--queue-size", "64",
                                     "--max-steps", "3", "--no-eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert differences_between_processes(tmp_path) == []  # the bank, refreshed from every process's queries


def test_normalize_sets_the_statistics_of_training_and_evaluation(tiny_folder, tmp_path, monkeypatch):
    """--normalize cifar10 (the MoCo CIFAR demo's statistics): the encoder that trains, the one
    the protocol evaluates and official_curve.py's all compute (x - mean) / std with CIFAR-10's
    mean and std; the default, ImageNet's."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import common
    import official_curve
    x = torch.rand(2, 3, 8, 8)
    for name, mean, std in (("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                            ("cifar10", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))):
        plain = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        args = common.parse_args(moco.Args, ["--normalize", name])
        assert torch.allclose(moco.encoder_of(nn.Identity(), args)(x), plain)
        curve = official_curve.parse(["--data-dir", "unused", "--out", "unused", "--extra", f"--normalize {name}"])
        assert torch.allclose(official_curve.encoder_from(None, curve).normalize(x), plain)
    assert common.parse_args(moco.Args, []).normalize == "imagenet"
    chosen = []
    real = moco.normalizer
    monkeypatch.setattr(moco, "normalizer", lambda args: chosen.append(args.normalize) or real(args))
    moco.main(tiny(tiny_folder, tmp_path, "--max-steps", "2", "--queue-size", "32", "--normalize", "cifar10"))
    assert len(chosen) >= 3 and set(chosen) == {"cifar10"}  # f_q, and the protocol's trained and random encoders


@pytest.mark.parametrize("argv, needle", [
    (["--queue-size", "1000", "--batch-size", "64"], "must be a multiple of the global batch 64"),
    (["--batch-size", "60", "--queue-size", "120"], "must be a multiple of --bn-splits 8"),
    (["--normalize", "cifar"], "--normalize must be imagenet or cifar10, not cifar"),
])
def test_bad_sizes_are_one_line(tmp_path, argv, needle):
    proc = run_script("moco.py", *argv, "--out", str(tmp_path))
    assert proc.returncode == 2 and needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr

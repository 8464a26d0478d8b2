"""simclr.py: NT-Xent against a plain loop, augmentations, LARS, and the script."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import simclr
from conftest import ROOT, differences_between_processes, script_env, torchrun
from test_rotation import run_script, tiny


def nt_xent_loop(z1, z2, tau):
    """The paper's l(i, j), written out anchor by anchor."""
    views = [v for pair in zip(z1, z2) for v in pair]  # any order works for a plain loop
    partner = {}
    for i in range(len(z1)):
        partner[id(z1[i])], partner[id(z2[i])] = z2[i], z1[i]
    total = 0.0
    for anchor in views:
        def s(a, b):
            return torch.dot(a, b) / (a.norm() * b.norm()) / tau
        numerator = torch.exp(s(anchor, partner[id(anchor)]))
        denominator = sum(torch.exp(s(anchor, other)) for other in views if other is not anchor)
        total = total - torch.log(numerator / denominator)
    return total / len(views)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_a_loop_over_anchors_and_its_gradient(n, tau):
    torch.manual_seed(n)
    z1 = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    loss = simclr.nt_xent(z1, z2, tau)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    r1, r2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    reference = nt_xent_loop(list(r1.unbind()), list(r2.unbind()), tau)
    reference.backward()
    assert torch.allclose(loss, reference)
    assert torch.allclose(g1, r1.grad) and torch.allclose(g2, r2.grad)


def test_nt_xent_gradcheck():
    torch.manual_seed(0)
    z1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: simclr.nt_xent(a, b, 0.3), (z1, z2))


def test_similarity_matrix_is_interleaved_with_the_diagonal_masked():
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    logits, targets = simclr.similarity_logits(z1, z2, 0.5)
    assert logits.shape == (6, 6) and targets.tolist() == [1, 0, 3, 2, 5, 4]
    assert torch.isinf(logits.diagonal()).all()
    assert logits[2, 3].item() == pytest.approx(F.cosine_similarity(z1[1], z2[1], dim=0).item() / 0.5, rel=1e-5)
    assert logits[0, 5].item() == pytest.approx(F.cosine_similarity(z1[0], z2[2], dim=0).item() / 0.5, rel=1e-5)


def test_identical_views_of_distinct_images_give_a_low_loss():
    z = torch.eye(8) * 10
    low, high = simclr.nt_xent(z, z, 0.1), simclr.nt_xent(z, torch.roll(z, 1, 0), 0.1)
    assert low < 0.01 and high > 5


def test_augment_choice():
    assert simclr.parse_augment("all", 32) == {"crop", "color"}
    assert simclr.parse_augment("all", 96) == {"crop", "color", "blur"}
    assert simclr.parse_augment("crop,color", 32) == {"crop", "color"}
    assert simclr.parse_augment("none", 32) == set()
    with pytest.raises(common.RunError, match="rotate"):
        simclr.parse_augment("crop,rotate", 32)
    args = simclr.Args()
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(simclr.augment(x, set(), args), x)
    colour_only = simclr.augment(x, {"color"}, args)
    assert colour_only.shape == x.shape and not torch.equal(colour_only, x)


def test_lars_step_against_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = simclr.LARS([w, b], lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.01)
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])  # |g| = 2
    opt.step()
    # trust ratio 0.01 * 5 / 2 = 0.025: step 0.1 * 0.025 * g; the bias is not scaled
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0 - 0.1 * 0.025 * 2.0]]))
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1 * 0.5]))


def test_end_to_end_writes_eval_json(tiny_folder, tmp_path):
    simclr.main(tiny(tiny_folder, tmp_path, "--epochs", "2"))
    saved = json.loads((tmp_path / "eval.json").read_text())
    for key in ("knn_top1", "linear_top1", "random_knn_top1", "random_linear_top1", "pretext_top1"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["steps"] == 2 * (160 // 16)
    common.build_backbone("small", 32)[0].load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True))


def test_a_short_run_learns(tmp_path):
    """40 steps on the built-in shapes: a test view finds its partner among 1023 others
    far more often than chance (1/1023)."""
    results = simclr.main(["--out", str(tmp_path), "--max-steps", "40", "--batch-size", "128", "--no-eval",
                           "--log-every", "0"])
    assert results["pretext_top1"] > 20 / 1023


def test_simclr_under_torchrun_two_processes(tiny_folder, tmp_path):
    proc = torchrun("simclr.py", *tiny(tiny_folder, tmp_path, "--max-steps", "3", "--no-eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert differences_between_processes(tmp_path) == []
    assert "negatives per view: 62" in proc.stdout  # 2 x 16 x 2 processes - 2


def test_two_processes_compute_the_one_process_loss_and_shuffle_keys():
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "tests/dist_check.py"], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok 0" in proc.stdout and "ok 1" in proc.stdout


def test_bad_augment_is_one_line(tmp_path):
    proc = run_script("simclr.py", "--augment", "crop,spin", "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --augment")


def test_the_head_is_the_released_codes_or_the_papers_plain_mlp():
    """--proj-bn (default): as the released code, linear (no bias), batch norm, ReLU, linear
    (no bias), batch norm with a scale but no shift (center=False). --no-proj-bn: the plain
    MLP of the paper's text, W2 relu(W1 h)."""
    torch.manual_seed(0)
    backbone = torch.nn.Flatten()
    released = simclr.SimCLR(backbone, 12, 4, proj_bn=True)
    kinds = [type(m).__name__ for m in released.g]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert released.g[0].bias is None and released.g[3].bias is None
    out_bn = released.g[4]
    assert not out_bn.bias.requires_grad and torch.equal(out_bn.bias, torch.zeros(4)) and out_bn.weight.requires_grad
    h = torch.randn(32, 12)
    with torch.no_grad():
        out_bn.weight.fill_(2.0)
        z = released.g(h)
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-5)  # batch-normalised, never shifted
    assert torch.allclose(z.std(0, unbiased=False), torch.full((4,), 2.0), atol=1e-3)  # only scaled
    plain = simclr.SimCLR(backbone, 12, 4, proj_bn=False)
    assert [type(m).__name__ for m in plain.g] == ["Linear", "ReLU", "Linear"]
    with torch.no_grad():
        expected = plain.g[2](torch.relu(plain.g[0](h)))
    assert torch.allclose(plain.g(h), expected)
    assert simclr.Args().proj_bn


def test_global_batch_norm_under_torchrun_on_gpus():
    """Paper sec. 2.2: batch norm statistics over all devices. On by default under
    torchrun on GPUs (SyncBatchNorm); not for one process, CPU processes or --no-sync-bn."""
    from types import SimpleNamespace

    def model():
        return simclr.SimCLR(common.build_backbone("small", 32)[0], 128, 128, proj_bn=True)

    def norms(m):
        return [type(x) for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]

    def run(distributed, cuda):
        return SimpleNamespace(distributed=distributed, cuda=cuda, print=lambda *a: None)

    synced = norms(simclr.global_batch_norm(model(), run(True, True), wanted=True))
    assert synced and set(synced) == {torch.nn.SyncBatchNorm}  # every batch norm, the head's too
    for r, wanted in ((run(False, True), True), (run(True, False), True), (run(True, True), False)):
        assert torch.nn.SyncBatchNorm not in norms(simclr.global_batch_norm(model(), r, wanted))
    assert simclr.Args().sync_bn

"""Copy the method, not the harness: the lecture's sections of a method file (model and loss,
and rotation's pretext data) copied alone into an empty folder train a backbone of the
copier's own with torch alone: no common.py, no builtin_data.py on the path."""
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

HEADER = "import copy\nimport math\n\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n"
SECTIONS = {"rotation": ("Pretext data", "Model", "Loss"), "simclr": ("Model", "Loss"), "moco": ("Model", "Loss")}


def lecture_sections(method: str, names) -> str:
    """The source of the named banner sections of <method>.py, each from its banner to the next."""
    lines = (ROOT / f"{method}.py").read_text().splitlines()
    banners = [i for i in range(len(lines) - 2)
               if lines[i].startswith("# ----") and lines[i + 2].startswith("# ----")]
    parts = []
    for name in names:
        start = next(i for i in banners if lines[i + 1].startswith(f"# {name}"))
        end = next((i for i in banners if i > start), len(lines))
        parts.append("\n".join(lines[start:end]))
    return "\n\n".join(parts)


TOY = "backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"

SCRIPTS = {
    "rotation": """
        from core import RotationNet, rotate_batch, rotation_loss
        model = RotationNet(backbone, 8, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            x, y = rotate_batch(torch.rand(6, 3, 16, 16))  # (24, 3, 16, 16), labels 0..3
            loss = rotation_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            assert torch.isfinite(loss) and backbone[0].weight.grad.abs().sum() > 0
            opt.step()
        """,
    "simclr": """
        from core import SimCLR, nt_xent
        model = SimCLR(backbone, 8, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            x = torch.rand(6, 3, 16, 16)
            z1, z2 = model(torch.cat([x, x.flip(-1)])).chunk(2)  # two views of each image
            loss = nt_xent(z1, z2, 0.5)
            opt.zero_grad()
            loss.backward()
            assert torch.isfinite(loss) and backbone[0].weight.grad.abs().sum() > 0
            opt.step()
        """,
    "moco": """
        from core import Encoder, MoCo, infonce
        moco = MoCo(Encoder(backbone, 8, 4, mlp=False), dim=4, K=12, m=0.9, t=0.1)
        opt = torch.optim.SGD(moco.f_q.parameters(), lr=0.1)
        for step in range(3):
            x = torch.rand(6, 3, 16, 16)
            q = F.normalize(moco.f_q(x), dim=1)
            with torch.no_grad():
                k = F.normalize(moco.f_k(x.flip(-1)), dim=1)
            loss, logits = infonce(q, k, moco.queue, moco.t)
            assert logits.shape == (6, 13) and torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            assert backbone[0].weight.grad.abs().sum() > 0
            assert all(p.grad is None for p in moco.f_k.parameters())  # f_k gets no gradient
            before_k = [p.clone() for p in moco.f_k.parameters()]
            opt.step()
            assert all(torch.equal(a, b) for a, b in zip(before_k, moco.f_k.parameters()))  # nor SGD's step
            moco.momentum_update()  # it moves by the momentum update alone
            for a, p_q, p_k in zip(before_k, moco.f_q.parameters(), moco.f_k.parameters()):
                assert torch.allclose(p_k, 0.9 * a + 0.1 * p_q)
            ptr = int(moco.queue_ptr)
            moco.enqueue_dequeue(k)
            assert int(moco.queue_ptr) == (ptr + 6) % 12 and torch.equal(moco.queue[:, ptr:ptr + 6], k.T)
        """,
}


@pytest.mark.parametrize("method", list(SECTIONS))
def test_the_lecture_sections_train_on_torch_alone(method, tmp_path):
    source = lecture_sections(method, SECTIONS[method])
    assert "common." not in "\n".join(line.split("#")[0] for line in source.splitlines())  # code, not comments
    (tmp_path / "core.py").write_text(HEADER + source + "\n")
    (tmp_path / "toy.py").write_text(HEADER + "torch.manual_seed(0)\n" + TOY + textwrap.dedent(SCRIPTS[method])
                                     + "print('ok')\n")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}  # no PYTHONPATH: no repository
    proc = subprocess.run([sys.executable, "toy.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    probe = subprocess.run([sys.executable, "-c", "import common"], cwd=tmp_path, env=env, capture_output=True)
    assert probe.returncode != 0  # common.py was not within reach


@pytest.mark.parametrize("method", list(SECTIONS))
def test_the_section_line_counts_in_the_readme(method):
    """README's "Copying a method" says how long each copy is; the count must stay true."""
    lines = len(lecture_sections(method, SECTIONS[method]).splitlines())
    assert f"`{method}.py`: {lines} lines" in (ROOT / "README.md").read_text()


def test_the_copying_doc_names_every_helper_a_copy_needs():
    """docs/copying.md's table: for every method, its sections' line count and the
    helpers of common.py they call, as the code has them now."""
    import re
    rows = re.findall(r"^\| `(\w+)\.py` \| ([a-z, ]+) \| (\d+) \| (.+?) \|$", (ROOT / "docs" / "copying.md").read_text(), re.M)
    assert len(rows) == 9
    for method, sections, count, needs in rows:
        names = [n.strip().capitalize() for n in sections.split(",")]
        source = lecture_sections(method, names)
        assert len(source.splitlines()) == int(count), method
        used = set(re.findall(r"common\.(\w+)", "\n".join(line.split("#")[0] for line in source.splitlines())))
        named = set(re.findall(r"common\.(\w+)", needs))
        assert used == named, (method, used, named)

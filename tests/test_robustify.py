"""Preemptive robustification (Moon et al. 2022): its contract, its effect, its CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import rfd
from rfd.analysis import cli
from rfd.data import default_fmnist_dir
from rfd.defenses.robustify import robustify

HAS_FMNIST = any(
    (default_fmnist_dir() / f"t10k-labels-idx1-ubyte{s}").exists() for s in ("", ".gz")
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return rfd.create_model("test_resnet", num_classes=10, in_chans=1)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))


def test_stays_in_the_ball_and_leaves_the_model_alone(tiny):
    tiny.train()  # a mode robustify must use eval for, and give back
    before = {k: v.clone() for k, v in tiny.state_dict().items()}  # weights and BN buffers
    x = images(6)
    x[0] = 0.0  # images at the box's edges: the delta-ball is clipped to [0, 1]
    x[1] = 1.0
    xr = robustify(tiny, x, delta=0.05, eps=0.05, steps=3, inner_steps=2)
    assert xr.shape == x.shape and xr.dtype == x.dtype and not xr.requires_grad
    assert (xr - x).abs().max() <= 0.05 + 1e-6
    assert xr.min() >= 0 and xr.max() <= 1
    assert (xr != x).any()  # it moved
    assert tiny.training and all(m.training for m in tiny.modules())
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in tiny.parameters())
    tiny.eval()


def test_deterministic_and_independent_of_batching(tiny):
    x = images(10, seed=1)
    y = torch.arange(10) % 10
    kw = dict(delta=0.05, eps=0.05, steps=3, inner_steps=2, seed=3)
    a = robustify(tiny, x, y, batch_size=10, **kw)
    assert torch.equal(a, robustify(tiny, x, y, batch_size=10, **kw))
    assert torch.equal(a, robustify(tiny, x, y, batch_size=3, **kw))
    assert not torch.equal(a, robustify(tiny, x, y, batch_size=10, **(kw | {"seed": 4})))
    with torch.inference_mode():  # a caller's inference/no-grad mode does not stop it
        assert torch.equal(a, robustify(tiny, x.clone(), y, batch_size=10, **kw))
    with torch.no_grad():
        assert torch.equal(a, robustify(tiny, x, y, batch_size=10, **kw))
    # an image's result is keyed by its id, not by which images share the call
    ids = torch.arange(100, 110)
    whole = robustify(tiny, x, y, ids=ids, **kw)
    part = robustify(tiny, x[4:7], y[4:7], ids=ids[4:7], **kw)
    assert torch.equal(whole[4:7], part)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delta": 0}, "delta must be a number in \\(0, 1\\]"),
        ({"delta": 1.5}, "delta must be"),
        ({"eps": -0.1}, "eps must be"),
        ({"eps": math.nan}, "eps must be"),
        ({"eps": "0.1"}, "eps must be a number"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 2.0}, "steps must be an integer"),
        ({"inner_steps": True}, "inner_steps must be an integer"),
        ({"step_size": 0.0}, "step_size must be a finite number > 0"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, "labels must be \\(N,\\)"),
        ({"labels": torch.full((4,), 10)}, "the model outputs 10 classes"),
        ({"ids": torch.zeros(4, dtype=torch.long)}, "ids must be distinct"),
        ({"ids": torch.zeros(4)}, "ids must be an \\(N,\\) = \\(4,\\) integer tensor"),
        ({"images": images(4) * 255}, "images must lie in \\[0, 1\\]"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(tiny, kwargs, message):
    args = {"images": images(4), "steps": 1, "inner_steps": 1} | kwargs
    with pytest.raises(ValueError, match=message) as e:
        robustify(tiny, **args)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST is not installed (make data)")
def test_robustified_images_resist_pgd_better(trained_fmnist):
    x, y, ids = next(iter(trained_fmnist.datamodule.eval_dataloader(60, seed=0)))
    model = trained_fmnist.model.eval()
    eps = 0.03
    xr = robustify(model, x, delta=eps, eps=eps, steps=10, inner_steps=3, ids=ids)
    kw = dict(attack="pgd", norm="linf", eps=eps, max_queries=30, criterion="single", ids=ids)
    before = rfd.attack(model, x, y, **kw).robust_accuracy()
    after = rfd.attack(model, xr, y, **kw).robust_accuracy()
    assert after >= before + 0.1, (before, after)


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST is not installed (make data)")
def test_cli_robustify_end_to_end(trained_fmnist, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "out"
    argv = ["robustify", "--checkpoint", str(trained_fmnist.checkpoint), "--n-images", "10",
            "--steps", "2", "--inner-steps", "1", "--deltas", "0.06", "--attacks", "pgd,fgsm",
            "--max-queries", "25", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    assert "| original | 0 |" in capsys.readouterr().out
    for name in ("robustify", "robustify_sweep"):
        for ext in ("md", "csv", "json"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
    assert (out / "robustify_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main = json.loads((out / "robustify.json").read_text())
    assert [r["image"] for r in main["rows"]] == ["original", "robustified"]
    sweep = json.loads((out / "robustify_sweep.json").read_text())["rows"]
    assert [r["delta"] for r in sweep] == [0.0, 0.03, 0.06]  # 0, --delta and --deltas
    for r in sweep:
        assert 0 <= r["PGD-20 robust acc"] <= r["clean acc"] <= 1
        assert r["mean Linf change"] <= r["delta"] + 1e-6
    assert main["meta"]["eps"] == 0.03 and main["meta"]["n_images"] == 10


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST is not installed (make data)")
def test_cli_rejects_an_unknown_attack_before_work(
    trained_fmnist, capsys: pytest.CaptureFixture, tmp_path: Path
):
    ckpt = str(trained_fmnist.checkpoint)
    argv = ["robustify", "--checkpoint", ckpt, "--attacks", "pgd,nope", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown attack 'nope'" in err and "\n" not in err

"""The grid benchmark (`make bench`): one process and one per core give the same grid, and the
report adds the processes' work up."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from rfd.settings import REPO_ROOT

BENCH = REPO_ROOT / "benchmarks" / "bench_attacks.py"


def bench(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--n-images", "10", "--queries", "60", "--batch", "32",
         "--attacks", "square,signflip", "--probe-every", "5", *args],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def cells(report: str) -> dict[str, str]:
    """Each cell's robust accuracy as printed (the column a layout must not change)."""
    rows = re.findall(r"^(\w+/\w+)\s+([\d.]+)\s", report, flags=re.M)
    return dict(rows)


@pytest.mark.slow
def test_two_processes_report_the_grid_of_one(trained_fmnist) -> None:
    ckpt = str(trained_fmnist.checkpoint)
    one = bench("--checkpoint", ckpt, "--procs", "1")
    two = bench("--checkpoint", ckpt, "--procs", "2", "--threads", "2")
    assert len(cells(one)) == 6 and cells(two) == cells(one)
    rows = [re.search(r"(\d+) rows \((\d+) charged", r).groups() for r in (one, two)]
    assert rows[0] == rows[1]  # the same queries, split between the processes
    assert "2 processes x 1 threads" in two and "processes done after" in two
    # the layout is held to the faster of its own plain forwards and one process's
    assert "efficiency is taken against the faster" in two
    eff = float(re.search(r"efficiency ([\d.]+)", two).group(1))
    assert 0 < eff <= 1.5


def test_procs_must_be_a_positive_integer_or_auto() -> None:
    out = subprocess.run([sys.executable, str(BENCH), "--procs", "0"], capture_output=True,
                         text=True, timeout=120, cwd=REPO_ROOT)  # fmt: skip
    assert out.returncode == 2 and "--procs takes a positive integer or auto" in out.stderr


def test_a_dying_process_ends_the_benchmark_instead_of_hanging(monkeypatch) -> None:
    """A worker that fails before the start barrier must not leave the others (and the parent)
    waiting there for ever."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCH.parent))
    import bench_attacks

    broken = argparse.Namespace()  # no settings: each worker fails while loading
    t0 = time.monotonic()
    with pytest.raises(SystemExit, match="failed with exit code 1"):
        bench_attacks.run_procs(broken, 2, {})
    assert time.monotonic() - t0 < 120

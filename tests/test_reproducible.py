"""The same command gives the same predictions, bit for bit, whatever else the machine is doing: each trained
method fitted twice with torch's default thread count, once on a quiet machine and once with every core kept
busy by other processes, the prediction files compared."""
import contextlib
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import TINY, run_script

BUSY_S = 600                                             # a busy process ends by itself after this, should a kill miss


@contextlib.contextmanager
def busy_cores():
    """One spinning process per core, for as long as the block runs. They are niced: each core stays busy, yet the
    fit's threads still get their turn (at equal priority every OpenMP barrier waits for a time slice, 10x slower)."""
    loop = f"import os, time\nos.nice(19)\nend = time.time() + {BUSY_S}\nwhile time.time() < end:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def quiet_and_busy(run, out):
    """run(folder) twice, into out/quiet and out/busy -> the two folders."""
    run(out / "quiet")
    with busy_cores():
        run(out / "busy")
    return out / "quiet", out / "busy"


def assert_identical(a, b, keys=("pred", "std")):
    with h5py.File(a, "r") as f, h5py.File(b, "r") as g:
        for k in keys:
            np.testing.assert_array_equal(f[k][()], g[k][()], err_msg=f"{k} of {a.name}")


@pytest.mark.parametrize("method,extra", [("stflow", ["--epochs", "1", "--samples", "2"]),
                                          ("triplex", ["--epochs", "1"]),
                                          ("merge", ["--epochs", "2"]),           # its first epoch trains at lr 0
                                          ("mlp", [])])
def test_trained_baselines_are_bit_identical_on_a_busy_machine(demo, method, extra, tmp_path):
    """An epoch or two of each peer: a race between threads shows from the first backward pass on (it did, in
    every peer, before harness.deterministic); the MLP baseline as it runs."""
    def fit(out):
        run_script("baselines.py", "--data", demo / "data", "--features", "stain", "--test-slice", "demo1",
                   "--method", method, "--out", out, *extra)
    quiet, busy = quiet_and_busy(fit, tmp_path)
    assert_identical(quiet / "demo1.h5", busy / "demo1.h5")


def test_hinge_is_bit_identical_on_a_busy_machine(demo, tmp_path):
    """train.py then sample.py, the tiny preset on the demo. --variant scratch trains every weight: each backward
    path of the default variant (frozen backbone) and more, with no backbone to pre-train first."""
    def fit(out):
        run_script("train.py", "--data", demo / "data", "--features", "stain", "--test-slice", "demo1", "--out", out,
                   *TINY, "--variant", "scratch", "--epochs", "2")
        run_script("sample.py", "--run", out, "--data", demo / "data", "--steps", "2", "--samples", "2",
                   "--out", out / "pred")
    quiet, busy = quiet_and_busy(fit, tmp_path)
    assert_identical(quiet / "pred" / "demo1.h5", busy / "pred" / "demo1.h5")

"""Shared fixtures: paths to ../shared, a runner for the stage scripts, small generated datasets."""
import gzip
import hashlib
import inspect
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
HER2ST = os.path.join(SHARED, "data", "her2st")
VOCAB = os.path.join(SHARED, "data", "cellfm", "gene_info.csv")
FIXTURES = os.path.join(SHARED, "fixtures")
sys.path.insert(0, ROOT)

needs_shared = pytest.mark.skipif(not os.path.isdir(HER2ST), reason=f"shared data not found at {SHARED}")


#################################################################################
#              The fast tier: `bash tests/run.sh --fast` skips `slow`            #
#################################################################################

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts a stage script, itself or through a fixture or helper (set "
                                       "here), or trains for minutes in-process (set by hand); `bash tests/run.sh "
                                       "--fast` leaves these out")


def starts_scripts(fn, seen):
    """Whether a test, fixture or helper runs a script: its source calls one, or a helper of tests/ it names does."""
    if (not inspect.isfunction(fn) or fn in seen
            or not inspect.getsourcefile(fn).startswith(os.path.join(ROOT, "tests"))):
        return False
    seen.add(fn)
    if "run_script(" in inspect.getsource(fn) or "subprocess." in inspect.getsource(fn):
        return True
    return any(starts_scripts(fn.__globals__.get(name), seen) for name in fn.__code__.co_names)


def pytest_collection_modifyitems(items):
    for item in items:
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if any(starts_scripts(fn, set()) for fn in [item.function, *fixtures]):
            item.add_marker(pytest.mark.slow)


def lay_out_hub_cache(cache, repo, files):
    """A Hugging Face cache folder as huggingface_hub writes it: each file ({name: source}) a blob named by
    its sha256, a snapshot of one commit linking to them, refs/main naming that commit -> {name: sha256}."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit, digests = "0123456789abcdef0123456789abcdef01234567", {}
    for sub in ("blobs", f"snapshots/{commit}", "refs"):
        os.makedirs(folder / sub, exist_ok=True)
    for name, src in files.items():
        digests[name] = hashlib.sha256(open(src, "rb").read()).hexdigest()
        shutil.copy(src, folder / "blobs" / digests[name])
        link = folder / "snapshots" / commit / name          # a file in a subfolder of the repository: a deeper link
        os.makedirs(link.parent, exist_ok=True)
        os.symlink(os.path.relpath(folder / "blobs" / digests[name], link.parent), link)
    (folder / "refs" / "main").write_text(commit)
    return digests


def run_script(script, *args, check=True):
    """Run a stage script as a user would; returns the CompletedProcess."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def assert_user_error(p, *words):
    """A one-line `error:` message naming what is wrong, exit status 2, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in p.stderr, p.stderr[-2000:]
    for w in words:
        assert w in last, (w, last)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo dataset with stain features (slices demo1..demo4)."""
    root = tmp_path_factory.mktemp("demo")
    run_script("prepare_data.py", "--out", root / "data")
    run_script("extract_features.py", "--data", root / "data", "--encoder", "stain")
    return root


def make_her2st(root, n_slices=3, n_spots=30, n_genes=60, img_mode="RGB", seed=0):
    """A small Her2ST-layout folder: counts TSVs, spot files with pixel centres and images."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i:02d}" for i in range(n_genes)] + ["MT-CO1", "RPL3"]
    for k in range(n_slices):
        name = f"A{k + 1}"
        xs, ys = np.meshgrid(np.arange(2, 8), np.arange(2, 7))
        xy = np.stack([xs.ravel(), ys.ravel()], 1)[:n_spots]
        counts = rng.poisson(rng.uniform(0.5, 20, len(genes)), (len(xy), len(genes)))
        os.makedirs(os.path.join(root, "ST-cnts"), exist_ok=True)
        os.makedirs(os.path.join(root, "ST-spotfiles"), exist_ok=True)
        with gzip.open(os.path.join(root, "ST-cnts", f"{name}.tsv.gz"), "wt") as f:
            f.write("\t" + "\t".join(genes) + "\n")
            for (x, y), row in zip(xy, counts):
                f.write(f"{x}x{y}\t" + "\t".join(map(str, row)) + "\n")
        with open(os.path.join(root, "ST-spotfiles", f"{name}_selection.tsv"), "w") as f:
            f.write("x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected\n")
            for x, y in xy:
                f.write(f"{x}\t{y}\t{x}.01\t{y}.02\t{100 * (x - 1) + 0.3:.2f}\t{100 * (y - 1) - 0.2:.2f}\t1\n")
        d = os.path.join(root, "ST-imgs", "A", name)
        os.makedirs(d, exist_ok=True)
        arr = rng.integers(0, 256, (720, 820, 3), dtype=np.uint8)
        im = Image.fromarray(arr)
        im = im.convert(img_mode) if img_mode != "RGB" else im
        im.save(os.path.join(d, f"{name}.png"))
    return root


TINY = ["--preset", "tiny", "--lr", "3e-3"]


def train(demo, out, *extra, check=True):
    """train.py on the demo, fold demo1, the tiny preset."""
    return run_script("train.py", "--data", demo / "data", "--features", "stain", "--test-slice", "demo1",
                      "--out", out, *TINY, *extra, check=check)


@pytest.fixture(scope="session")
def backbone(demo):
    """A tiny backbone pre-trained on the demo without demo1."""
    out = demo / "backbone.safetensors"
    run_script("pretrain.py", "--data", demo / "data", "--exclude", "demo1", "--preset", "tiny",
               "--epochs", "12", "--lr", "3e-3", "--out", out)
    return out


@pytest.fixture(scope="session")
def hinge_run(demo, backbone):
    """HINGE trained 3 epochs on the demo, demo1 held out."""
    out = demo / "hinge"
    train(demo, out, "--backbone-ckpt", backbone, "--epochs", "3")
    return out

"""Helpers shared by the stage scripts: one-line user errors, atomic HDF5 writes, slice-file I/O."""
import contextlib
import glob
import os
import sys

import h5py
import numpy as np


class UserError(Exception):
    """A mistake in the user's input: printed as one line (file, what is wrong, what to do), no traceback."""


def run(main):
    """Call main(); user mistakes end the program with a one-line error and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name; rename it to `path` only when the block completes, so an interrupted
    run never leaves a half file that a later stage trusts."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".tmp*"):  # left by a killed run
        os.remove(stale)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_h5(path):
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=False) as f:
            yield f


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def str_array(items):
    return np.array([str(s).encode() for s in items], dtype="S")


def decode(arr):
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(arr).reshape(-1)]


def slice_path(data_dir, name):
    return os.path.join(data_dir, "slices", f"{name}.h5")


def list_slices(data_dir):
    """Slice names in the order of `<data>/slices.tsv` (written last by prepare_data.py)."""
    tsv = os.path.join(data_dir, "slices.tsv")
    if not os.path.isfile(tsv):
        raise UserError(f"{tsv} not found: run prepare_data.py --out {data_dir} first")
    with open(tsv) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [r[0] for r in rows if r and r[0]]

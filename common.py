"""The files every stage reads and writes: one-line user errors, atomic writes, slice files and gene vocabularies."""
import contextlib
import glob
import json
import os
import sys

import h5py
import numpy as np
import pandas as pd


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


def existing_slice(data_dir, name):
    path = slice_path(data_dir, name)
    if not os.path.isfile(path):
        raise UserError(f"{path}: slice {name} not found in {data_dir}; check the slice name (see slices.tsv)")
    return path


def list_slices(data_dir):
    """Slice names in the order of `<data>/slices.tsv` (written last by prepare_data.py)."""
    tsv = os.path.join(data_dir, "slices.tsv")
    if not os.path.isfile(tsv):
        raise UserError(f"{tsv} not found: run prepare_data.py --out {data_dir} first")
    with open(tsv) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [r[0] for r in rows if r and r[0]]


def read_slice(data_dir, name, keys=("expr",)):
    with h5py.File(existing_slice(data_dir, name), "r") as f:
        return {k: f[k][()] for k in keys}


def read_vocab(path):
    """Gene symbol -> token id: CellFM's gene_info.csv (id = row index + 1, as CellFM's own code builds it) or
    scGPT's vocab.json ({token: id}, ids from 0; its special tokens <pad>, <cls>, <eoc> are no genes)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: vocabulary file not found; pass CellFM's csv/gene_info.csv or scGPT's vocab.json")
    if path.lower().endswith(".json"):
        try:
            with open(path) as f:
                vocab = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e}); pass scGPT's vocab.json") from e
        if not isinstance(vocab, dict) or not all(isinstance(i, int) and i >= 0 for i in vocab.values()):
            raise UserError(f"{path}: not an scGPT vocab.json (an object of gene -> non-negative integer id)")
        return {g: i for g, i in vocab.items() if not (g.startswith("<") and g.endswith(">"))}  # symbols have no <>
    df = pd.read_csv(path)
    col = next((c for c in ("HGNC_gene", "gene_name", "gene", "symbol") if c in df.columns), None)
    if col is None:
        raise UserError(f"{path}: no HGNC_gene column (found {', '.join(map(str, df.columns[:6]))}); "
                        "pass CellFM's csv/gene_info.csv, whose rows give the token ids")
    return {str(g): i + 1 for i, g in enumerate(df[col])}


def read_gene_list(path):
    """A gene list, one symbol per line in model order (the official HINGE code's used_selected_gene_list.txt)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: gene list not found")
    genes = [g.strip() for g in open(path) if g.strip()]
    dup = sorted({g for g in genes if genes.count(g) > 1})
    if not genes or dup:
        raise UserError(f"{path}: " + (f"genes listed twice: {', '.join(dup[:5])}" if dup else "no genes"))
    return genes

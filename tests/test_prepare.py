"""prepare_data.py: real Her2ST, the demo, Visium and HEST layouts, and every bad input found with real files."""
import glob
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import HER2ST, ROOT, VOCAB, assert_user_error, make_her2st, needs_shared, run_script
from common import decode

Image.MAX_IMAGE_PIXELS = None


def digest(folder):
    return {os.path.relpath(p, folder): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)) if os.path.isfile(p)}


# ----------------------------------------------------------------------------- real Her2ST

@pytest.fixture(scope="module")
def her2st_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("her2st")
    run_script("prepare_data.py", "--dataset", "her2st", "--raw", HER2ST, "--vocab", VOCAB, "--out", out)
    return out


@needs_shared
def test_her2st_writes_36_slices_6_with_images(her2st_out):
    files = sorted(glob.glob(os.path.join(her2st_out, "slices", "*.h5")))
    assert len(files) == 36
    with_img = sorted(os.path.basename(f)[:-3] for f in files if "img" in h5py.File(f, "r"))
    assert with_img == ["B4", "C2", "C3", "C4", "C5", "C6"]
    tsv = pd.read_csv(os.path.join(her2st_out, "slices.tsv"), sep="\t")
    assert len(tsv) == 36 and tsv.has_image.sum() == 6 and tsv.n_spots.sum() == 13620


@needs_shared
def test_her2st_expr_is_log2_of_raw_counts(her2st_out):
    rng = np.random.default_rng(0)
    for name in ["A1", "C2", "H3"]:
        raw = pd.read_csv(os.path.join(HER2ST, "ST-cnts", f"{name}.tsv.gz"), sep="\t", index_col=0)
        with h5py.File(os.path.join(her2st_out, "slices", f"{name}.h5"), "r") as f:
            genes, bcs, expr, counts = decode(f["genes"]), decode(f["barcode"]), f["expr"][()], f["counts"][()]
        for _ in range(50):
            i, g = rng.integers(len(bcs)), rng.integers(len(genes))
            assert counts[i, g] == raw.loc[bcs[i], genes[g]]
            assert expr[i, g] == pytest.approx(np.log2(raw.loc[bcs[i], genes[g]] + 1), abs=1e-6)


@needs_shared
def test_her2st_pixels_and_patch_centres(her2st_out):
    spots = pd.read_csv(os.path.join(HER2ST, "ST-spotfiles", "C2_selection.tsv"), sep="\t")
    spots.index = [f"{x}x{y}" for x, y in zip(spots.x, spots.y)]
    img = np.asarray(Image.open(glob.glob(os.path.join(HER2ST, "ST-imgs", "C", "C2", "*.jpg"))[0]).convert("RGB"))
    with h5py.File(os.path.join(her2st_out, "slices", "C2.h5"), "r") as f:
        bcs, pixel = decode(f["barcode"]), f["pixel"][()]
        assert f["img"].shape[1:] == (224, 224, 3) and f.attrs["patch_px_native"] == 224
        assert 0.6 < f.attrs["pixel_size_um"] < 0.8      # ~0.69 µm/px for patients B-H (data README)
        np.testing.assert_allclose(pixel, spots.loc[bcs, ["pixel_x", "pixel_y"]].to_numpy(np.float32))
        for i in [0, 17, len(bcs) - 1]:
            x, y = int(round(pixel[i, 0])), int(round(pixel[i, 1]))
            np.testing.assert_array_equal(f["img"][i, 112, 112], img[y, x])
            np.testing.assert_array_equal(f["img"][i, 100:124, 90:130], img[y - 12:y + 12, x - 22:x + 18])


@needs_shared
def test_her2st_gene_ids_index_the_vocabulary(her2st_out):
    vocab = pd.read_csv(VOCAB)["HGNC_gene"].tolist()
    with h5py.File(os.path.join(her2st_out, "slices", "B1.h5"), "r") as f:
        genes, ids = decode(f["genes"]), f["gene_ids"][()]
    assert 200 <= len(genes) <= 300 and all(vocab[i - 1] == g for g, i in zip(genes, ids))
    assert not any(g.startswith(("MT-", "RPS", "RPL")) for g in genes)
    assert open(os.path.join(her2st_out, "genes.txt")).read().split() == genes


# ----------------------------------------------------------------------------- demo and re-runs

def test_demo_is_byte_identical_and_learnable(tmp_path):
    run_script("prepare_data.py", "--out", tmp_path / "a")
    run_script("prepare_data.py", "--out", tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    with h5py.File(tmp_path / "a" / "slices" / "demo1.h5", "r") as f:
        img, expr = f["img"][()], f["expr"][()]
    # colour separates compartments and compartments drive expression: patch colour predicts genes
    colour = img.reshape(len(img), -1, 3).mean(1)
    r = [abs(np.corrcoef(colour[:, 0], expr[:, g])[0, 1]) for g in range(expr.shape[1]) if expr[:, g].std() > 0]
    assert np.mean(np.array(r) > 0.5) > 0.1


def test_interrupted_run_completes_identically(tmp_path):
    run_script("prepare_data.py", "--out", tmp_path / "ref")
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not glob.glob(str(out / "slices" / "*.h5*")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "slices.tsv").exists()            # an interrupted run is never taken as complete
    run_script("prepare_data.py", "--out", out)
    assert digest(out) == digest(tmp_path / "ref")      # leftover temporary files are gone too


def test_rerun_skips_complete_files_and_refuses_other_dataset(tmp_path):
    raw = make_her2st(tmp_path / "raw")
    out = tmp_path / "out"
    run_script("prepare_data.py", "--out", out)
    before = digest(out)
    p = run_script("prepare_data.py", "--dataset", "her2st", "--raw", raw, "--out", out, check=False)
    assert_user_error(p, str(out), "demo", "--overwrite")
    assert digest(out) == before
    mtimes = {f: os.path.getmtime(f) for f in glob.glob(str(out / "slices" / "*.h5"))}
    run_script("prepare_data.py", "--out", out)
    assert mtimes == {f: os.path.getmtime(f) for f in glob.glob(str(out / "slices" / "*.h5"))}


# ----------------------------------------------------------------------------- bad inputs

def prepare_small(raw, out, *extra):
    return run_script("prepare_data.py", "--dataset", "her2st", "--raw", raw, "--out", out, "--n-top", 40, *extra,
                      check=False)


def assert_nothing_written(out):
    assert not os.path.exists(out) or not glob.glob(os.path.join(out, "**", "*.*"), recursive=True)


def test_small_her2st_layout_works(tmp_path):
    raw = make_her2st(tmp_path / "raw")
    p = prepare_small(raw, tmp_path / "out")
    assert p.returncode == 0, p.stderr
    with h5py.File(tmp_path / "out" / "slices" / "A1.h5", "r") as f:
        assert f["img"].shape == (30, 224, 224, 3)
        assert (f["img"][0, :5, :5] == 255).all()       # spot at pixel 100: patch reaches past the border -> white
        assert f["array"][0].tolist() == [2, 2]


def test_missing_counts_file(tmp_path):
    raw = make_her2st(tmp_path / "raw")
    os.remove(raw / "ST-cnts" / "A2.tsv.gz")
    p = prepare_small(raw, tmp_path / "out")
    assert_user_error(p, "A2.tsv.gz", "missing")
    assert_nothing_written(tmp_path / "out")


def test_missing_image(tmp_path):
    raw = make_her2st(tmp_path / "raw")
    os.remove(raw / "ST-imgs" / "A" / "A3" / "A3.png")
    p = prepare_small(raw, tmp_path / "out")
    assert_user_error(p, "A3", "no image")
    assert_nothing_written(tmp_path / "out")


def test_slice_without_image_folder_is_written_with_one_warning(tmp_path):
    raw = make_her2st(tmp_path / "raw")
    shutil.rmtree(raw / "ST-imgs" / "A" / "A3")
    p = prepare_small(raw, tmp_path / "out")
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if "warning" in line]
    assert warnings == ["warning: 1 of 3 slices have no H&E image (A3): they serve gene selection and "
                        "pre-training only"]
    with h5py.File(tmp_path / "out" / "slices" / "A3.h5", "r") as f:
        assert "img" not in f and len(f["barcode"]) == 30
    with h5py.File(tmp_path / "out" / "slices" / "A1.h5", "r") as f:
        assert "img" in f


def test_unmatched_spots_need_allow_unmatched(tmp_path):
    raw = make_her2st(tmp_path / "raw")
    spots = pd.read_csv(raw / "ST-spotfiles" / "A1_selection.tsv", sep="\t")
    spots.iloc[3:].to_csv(raw / "ST-spotfiles" / "A1_selection.tsv", sep="\t", index=False)
    p = prepare_small(raw, tmp_path / "out")
    assert_user_error(p, "A1_selection.tsv", "3 of 30", "--allow-unmatched")
    assert_nothing_written(tmp_path / "out")
    p = prepare_small(raw, tmp_path / "out", "--allow-unmatched")
    assert p.returncode == 0, p.stderr
    with h5py.File(tmp_path / "out" / "slices" / "A1.h5", "r") as f:
        assert len(f["barcode"]) == 27


def test_vocab_without_expected_column(tmp_path):
    raw = make_her2st(tmp_path / "raw")
    pd.DataFrame({"name": ["G01"], "x": [1]}).to_csv(tmp_path / "v.csv", index=False)
    p = prepare_small(raw, tmp_path / "out", "--vocab", tmp_path / "v.csv")
    assert_user_error(p, "v.csv", "HGNC_gene")
    assert_nothing_written(tmp_path / "out")


def test_vocab_and_aliases(tmp_path):
    raw = make_her2st(tmp_path / "raw")
    pd.DataFrame({"HGNC_gene": ["NEW01", "G02", "G03", "G05"]}).to_csv(tmp_path / "v.csv", index=False)
    (tmp_path / "a.tsv").write_text("old\tnew\nG01\tNEW01\n")
    p = prepare_small(raw, tmp_path / "out", "--vocab", tmp_path / "v.csv", "--aliases", tmp_path / "a.tsv")
    assert p.returncode == 0, p.stderr
    with h5py.File(tmp_path / "out" / "slices" / "A1.h5", "r") as f:
        genes, ids = decode(f["genes"]), f["gene_ids"][()].tolist()
    assert dict(zip(genes, ids)) == {"G02": 2, "G03": 3, "G05": 4, "NEW01": 1}


def test_empty_slice(tmp_path):
    raw = make_her2st(tmp_path / "raw")
    header = gzip.open(raw / "ST-cnts" / "A2.tsv.gz", "rt").readline()
    with gzip.open(raw / "ST-cnts" / "A2.tsv.gz", "wt") as f:
        f.write(header)
    p = prepare_small(raw, tmp_path / "out")
    assert_user_error(p, "A2.tsv.gz", "no spots")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("value", ["nan", "-3"])
def test_nan_or_negative_counts(tmp_path, value):
    raw = make_her2st(tmp_path / "raw")
    df = pd.read_csv(raw / "ST-cnts" / "A1.tsv.gz", sep="\t", index_col=0).astype(float)
    df.iloc[4, 7] = float(value)
    df.to_csv(raw / "ST-cnts" / "A1.tsv.gz", sep="\t")
    p = prepare_small(raw, tmp_path / "out")
    assert_user_error(p, "A1.tsv.gz", "NaN" if value == "nan" else "1 negative")
    assert_nothing_written(tmp_path / "out")


def test_log_values_are_refused(tmp_path):
    raw = make_her2st(tmp_path / "raw")
    df = pd.read_csv(raw / "ST-cnts" / "A1.tsv.gz", sep="\t", index_col=0)
    np.log1p(df).to_csv(raw / "ST-cnts" / "A1.tsv.gz", sep="\t")
    p = prepare_small(raw, tmp_path / "out")
    assert_user_error(p, "A1.tsv.gz", "slice A1", "non-integer", "raw counts")
    assert_nothing_written(tmp_path / "out")


def test_spot_outside_image(tmp_path):
    raw = make_her2st(tmp_path / "raw")
    spots = pd.read_csv(raw / "ST-spotfiles" / "A2_selection.tsv", sep="\t")
    spots.loc[5, "pixel_x"] = 5000.0
    spots.to_csv(raw / "ST-spotfiles" / "A2_selection.tsv", sep="\t", index=False)
    p = prepare_small(raw, tmp_path / "out")
    assert_user_error(p, "A2.png", "1 of 30", "outside")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_images_are_converted(tmp_path, mode):
    raw = make_her2st(tmp_path / "raw", img_mode=mode)
    p = prepare_small(raw, tmp_path / "out")
    assert p.returncode == 0, p.stderr
    src = np.asarray(Image.open(raw / "ST-imgs" / "A" / "A1" / "A1.png").convert("RGB"))
    with h5py.File(tmp_path / "out" / "slices" / "A1.h5", "r") as f:
        x, y = np.round(f["pixel"][10]).astype(int)
        np.testing.assert_array_equal(f["img"][10, 112, 112], src[y, x])
        if mode == "L":
            assert (f["img"][10, ..., 0] == f["img"][10, ..., 2]).all()


# ----------------------------------------------------------------------------- Visium and HEST

def write_visium(outs, barcodes, genes, counts, xy, new_positions, image_size=(400, 500)):
    from scipy.sparse import csc_matrix
    os.makedirs(outs / "spatial", exist_ok=True)
    m = csc_matrix(counts.T)
    with h5py.File(outs / "filtered_feature_bc_matrix.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"], g["shape"] = m.data, m.indices, m.indptr, np.array(m.shape)
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        g["features/name"] = np.array([s.encode() for s in genes])
        g["features/id"] = np.array([f"ENSG{i}".encode() for i in range(len(genes))])
        g["features/feature_type"] = np.array([b"Gene Expression"] * len(genes))
    pos = pd.DataFrame({"barcode": barcodes, "in_tissue": 1, "array_row": np.arange(len(barcodes)) // 5,
                        "array_col": np.arange(len(barcodes)) % 5, "pxl_row_in_fullres": xy[:, 1],
                        "pxl_col_in_fullres": xy[:, 0]})
    if new_positions:
        pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    else:
        pos.to_csv(outs / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    json.dump({"spot_diameter_fullres": 89.4, "tissue_hires_scalef": 0.1},
              open(outs / "spatial" / "scalefactors_json.json", "w"))
    img = np.random.default_rng(1).integers(0, 256, (*image_size[::-1], 3), dtype=np.uint8)
    Image.fromarray(img).save(outs.parent / "full.png")
    return img


def test_visium_both_position_formats(tmp_path):
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(30)]
    ref = {}
    for k, new in enumerate([True, False]):
        bcs = [f"AAAC{i:04d}-1" for i in range(20)]
        counts = rng.poisson(5, (20, 30)).astype(np.float32)
        xy = rng.uniform(50, 350, (20, 2)).round(1)
        img = write_visium(tmp_path / "raw" / f"S{k}" / "outs", bcs, genes, counts, xy, new)
        ref[f"S{k}"] = (counts, xy, img)
    run_script("prepare_data.py", "--dataset", "visium", "--raw", tmp_path / "raw", "--out", tmp_path / "out",
               "--n-top", 30)
    for name, (counts, xy, img) in ref.items():
        with h5py.File(tmp_path / "out" / "slices" / f"{name}.h5", "r") as f:
            cols = [int(g[1:]) for g in decode(f["genes"])]
            np.testing.assert_array_equal(f["counts"][()], counts[:, cols])
            x, y = np.round(xy[3]).astype(int)
            np.testing.assert_array_equal(f["img"][3, 112, 112], img[y, x])
            assert f.attrs["pixel_size_um"] == pytest.approx(55 / 89.4)


def small_visium(outs, new_positions=True):
    rng = np.random.default_rng(0)
    genes, bcs = [f"G{i}" for i in range(30)], [f"AAAC{i:04d}-1" for i in range(20)]
    counts = rng.poisson(5, (20, 30)).astype(np.float32)
    write_visium(outs, bcs, genes, counts, rng.uniform(50, 350, (20, 2)).round(1), new_positions)


def prepare_visium(raw, out):
    return run_script("prepare_data.py", "--dataset", "visium", "--raw", raw, "--out", out, "--n-top", 30, check=False)


def test_visium_headerless_tissue_positions_csv(tmp_path):
    for name in ("headed", "headerless"):
        small_visium(tmp_path / "raw" / name / "outs")
    pos = tmp_path / "raw" / "headerless" / "outs" / "spatial" / "tissue_positions.csv"
    pos.write_text(pos.read_text().split("\n", 1)[1])  # a renamed tissue_positions_list.csv
    p = prepare_visium(tmp_path / "raw", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    with h5py.File(tmp_path / "out" / "slices" / "headed.h5", "r") as a, \
            h5py.File(tmp_path / "out" / "slices" / "headerless.h5", "r") as b:
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k][()], b[k][()])


@pytest.mark.parametrize("text", ["barcode,x,y\nAAAC0000-1,1,2\n", "AAAC0000-1,1,2\n"])
def test_visium_positions_with_wrong_columns(tmp_path, text):
    small_visium(tmp_path / "raw" / "outs")
    (tmp_path / "raw" / "outs" / "spatial" / "tissue_positions.csv").write_text(text)
    p = prepare_visium(tmp_path / "raw", tmp_path / "out")
    assert_user_error(p, "tissue_positions.csv", "array_row", "pxl_col_in_fullres")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("content", ["text", "no matrix group"])
def test_visium_matrix_that_is_not_space_ranger_h5(tmp_path, content):
    small_visium(tmp_path / "raw" / "outs")
    h5 = tmp_path / "raw" / "outs" / "filtered_feature_bc_matrix.h5"
    if content == "text":
        h5.write_text("barcode,G0\nAAAC0000-1,3\n")
    else:
        with h5py.File(h5, "w") as f:
            f.create_group("GRCh38")                     # pre-3.0 Space Ranger: one group per genome
    p = prepare_visium(tmp_path / "raw", tmp_path / "out")
    assert_user_error(p, "filtered_feature_bc_matrix.h5", "not an HDF5 file" if content == "text" else "'matrix' group")
    assert_nothing_written(tmp_path / "out")


def write_csr(f, key, X):
    from scipy.sparse import csr_matrix
    m = csr_matrix(X)
    g = f.create_group(key)
    g.attrs["encoding-type"], g.attrs["shape"] = "csr_matrix", np.array(X.shape)
    g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr


def write_h5ad(path, X, genes, barcodes, xy, diameter):
    with h5py.File(path, "w") as f:
        write_csr(f, "X", X)
        f.create_group("var").attrs["_index"] = "_index"
        f["var/_index"] = np.array([s.encode() for s in genes])
        f.create_group("obs").attrs["_index"] = "_index"
        f["obs/_index"] = np.array([s.encode() for s in barcodes])
        f["obs/array_row"], f["obs/array_col"] = np.arange(len(barcodes)) // 4, np.arange(len(barcodes)) % 4
        f["obsm/spatial"] = xy
        f["uns/spatial/ST/scalefactors/spot_diameter_fullres"] = diameter


def test_hest_patches_and_tiled_wsi(tmp_path):
    import tifffile
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    for d in ("st", "patches", "wsis"):
        os.makedirs(raw / d)
    genes = [f"G{i}" for i in range(25)]
    bcs = [f"B{i}" for i in range(12)]
    X = rng.poisson(4, (12, 25)).astype(np.float32)
    xy = rng.uniform(120, 900, (12, 2))
    write_h5ad(raw / "st" / "TENX1.h5ad", X, genes, bcs, xy, 150.0)
    write_h5ad(raw / "st" / "TENX2.h5ad", X, genes, bcs, xy, 300.0)
    patches = rng.integers(0, 256, (11, 224, 224, 3), dtype=np.uint8)   # HEST dropped spot B4
    with h5py.File(raw / "patches" / "TENX1.h5", "w") as f:
        f["img"] = patches
        f["barcode"] = np.array([[b.encode()] for b in bcs if b != "B4"])[::-1]
    wsi = rng.integers(0, 256, (1000, 1100, 3), dtype=np.uint8)
    tifffile.imwrite(raw / "wsis" / "TENX2.tif", wsi, tile=(256, 256), compression="zlib")
    run_script("prepare_data.py", "--dataset", "hest", "--raw", raw, "--out", tmp_path / "out", "--n-top", 25)
    with h5py.File(tmp_path / "out" / "slices" / "TENX1.h5", "r") as f:
        got = decode(f["barcode"])
        assert got == [b for b in bcs if b != "B4"]
        np.testing.assert_array_equal(f["img"][0], patches[10])     # joined by barcode, not row
    with h5py.File(tmp_path / "out" / "slices" / "TENX2.h5", "r") as f:
        assert f.attrs["patch_px_native"] == 300
        side = 300
        x, y = np.round(xy[5]).astype(int)
        native = np.full((side, side, 3), 255, np.uint8)
        ya, xa = y - side // 2, x - side // 2
        sub = wsi[max(ya, 0):ya + side, max(xa, 0):xa + side]
        native[max(-ya, 0):max(-ya, 0) + sub.shape[0], max(-xa, 0):max(-xa, 0) + sub.shape[1]] = sub
        expect = np.asarray(Image.fromarray(native).resize((224, 224), Image.LANCZOS))
        np.testing.assert_array_equal(f["img"][5], expect)


def prepare_hest(raw, out):
    return run_script("prepare_data.py", "--dataset", "hest", "--raw", raw, "--out", out, "--n-top", 25, check=False)


def test_hest_h5ad_that_is_not_hdf5(tmp_path):
    os.makedirs(tmp_path / "raw" / "st")
    (tmp_path / "raw" / "st" / "TENX1.h5ad").write_text("barcode,G0\nB0,3\n")
    p = prepare_hest(tmp_path / "raw", tmp_path / "out")
    assert_user_error(p, "TENX1.h5ad", "not an HDF5 file", "AnnData")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("key", ["layers/counts", "raw/X", None])
def test_hest_log_normalised_x_falls_back_to_raw_counts(tmp_path, key):
    rng = np.random.default_rng(0)
    path = tmp_path / "raw" / "st" / "TENX1.h5ad"
    os.makedirs(path.parent)
    genes, bcs = [f"G{i}" for i in range(25)], [f"B{i}" for i in range(12)]
    counts = rng.poisson(4, (12, 25)).astype(np.float32)
    write_h5ad(path, np.log1p(counts / counts.sum(1, keepdims=True) * 1e4), genes, bcs,
               rng.uniform(120, 900, (12, 2)), 150.0)
    with h5py.File(path, "a") as f:
        if key == "layers/counts":
            write_csr(f, key, counts)
        elif key == "raw/X":                             # raw keeps its own genes, here in reverse order
            write_csr(f, key, counts[:, ::-1])
            f.create_group("raw/var").attrs["_index"] = "_index"
            f["raw/var/_index"] = np.array([s.encode() for s in genes[::-1]])
    p = prepare_hest(tmp_path / "raw", tmp_path / "out")
    if key is None:
        assert_user_error(p, "TENX1.h5ad", "slice TENX1", "non-integer", "raw counts")
        assert_nothing_written(tmp_path / "out")
        return
    assert p.returncode == 0, p.stderr
    assert key in p.stdout
    with h5py.File(tmp_path / "out" / "slices" / "TENX1.h5", "r") as f:
        cols = [int(g[1:]) for g in decode(f["genes"])]
        np.testing.assert_array_equal(f["counts"][()], counts[:, cols])

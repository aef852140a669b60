"""Visium HD: binned_outputs/square_008um|016um read exactly as Space Ranger writes them, their bad inputs, bin grids
for slides without expression, and the units and provenance every prediction's AnnData states."""
import glob
import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile

import extract_features as X
import prepare_data as P
import readers as R
import visium as V
from common import decode
from conftest import assert_user_error, run_script
from folds import Context, Geometry, context_features, slice_geometry, square_lattice
from predictions import PredictionFile, provenance, write_anndata

UM = 0.5                                                 # µm per full-resolution pixel of the test slides
ANGLE = 0.4                                              # the image is rotated against the capture array (radians)
GENES = ["MT-CO1", "RPL3"] + [f"GENE{i:02d}" for i in range(30)] + ["AC0001.1", "LINC9999", "OLD1"]
NOT_IN_VOCAB = ["AC0001.1", "LINC9999", "OLD1"]


def write_hd_bins(outs, bin_um, side_um=96, seed=0):
    """outs/binned_outputs/square_<bin>um in Space Ranger's layout and names: the filtered matrix of the bins
    under tissue (barcodes in another order than the positions), the Parquet positions of every bin of the
    capture area in full-resolution pixels, the scale factors -> what was written, in the matrix's order."""
    rng = np.random.default_rng(seed + bin_um)
    folder = outs / "binned_outputs" / f"square_{bin_um:03d}um"
    os.makedirs(folder / "spatial", exist_ok=True)
    n, pitch = side_um // bin_um, bin_um / UM
    row, col = np.divmod(np.arange(n * n), n)
    u, v = (col + 0.5) * pitch, (row + 0.5) * pitch     # array position -> image pixel: a rotation and a shift
    x, y = 130 + u * np.cos(ANGLE) - v * np.sin(ANGLE), 40 + u * np.sin(ANGLE) + v * np.cos(ANGLE)
    barcodes = np.array([f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(row, col)])
    tissue = rng.random(n * n) < 0.8
    pd.DataFrame({"barcode": barcodes, "in_tissue": tissue.astype(np.int32), "array_row": row.astype(np.int32),
                  "array_col": col.astype(np.int32), "pxl_row_in_fullres": y, "pxl_col_in_fullres": x}
                 ).to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
    order = rng.permutation(np.flatnonzero(tissue))
    counts = rng.poisson(rng.uniform(0.05, 3, len(GENES)), (len(order), len(GENES))).astype(np.int32)
    from scipy.sparse import csc_matrix
    m = csc_matrix(counts.T)
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices.astype(np.int64), m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, np.int32)
        g["barcodes"] = np.array([b.encode() for b in barcodes[order]])
        g["features/name"] = np.array([s.encode() for s in GENES])
        g["features/id"] = np.array([f"ENSG{i:011d}".encode() for i in range(len(GENES))])
        g["features/feature_type"] = np.array([b"Gene Expression"] * len(GENES))
        g["features/genome"] = np.array([b"GRCh38"] * len(GENES))
        g["features/_all_tag_keys"] = np.array([b"genome"])
    json.dump({"spot_diameter_fullres": bin_um / UM, "bin_size_um": float(bin_um), "microns_per_pixel": UM,
               "regist_target_img_scalef": 0.25, "tissue_lowres_scalef": 0.02, "fiducial_diameter_fullres": 400.0,
               "tissue_hires_scalef": 0.2}, open(folder / "spatial" / "scalefactors_json.json", "w"))
    return {"barcodes": list(barcodes[order]), "counts": counts, "array": np.stack([col, row], 1)[order],
            "pixel": np.stack([x, y], 1)[order]}


def write_hd(root, bins=(8, 16)):
    """<root>/S1/outs/binned_outputs with the given bins, and the full-resolution H&E beside outs/."""
    outs = root / "S1" / "outs"
    written = {b: write_hd_bins(outs, b) for b in bins}
    os.makedirs(outs / "binned_outputs" / "square_002um", exist_ok=True)  # Space Ranger's 2 µm bins: never read
    img = np.random.default_rng(5).integers(0, 256, (360, 400, 3), dtype=np.uint8)
    tifffile.imwrite(root / "S1" / "he.tif", img, tile=(128, 128), photometric="rgb", compression="zlib",
                     resolution=(1e4 / UM, 1e4 / UM), resolutionunit="CENTIMETER")
    return written, img


def prepare_hd(raw, out, *extra, check=False):
    return run_script("prepare_data.py", "--dataset", "visium-hd", "--raw", raw, "--out", out, "--n-top", 100, *extra,
                      check=check)


def assert_nothing_written(out):
    assert not glob.glob(os.path.join(out, "**", "*.*"), recursive=True)


# ----------------------------------------------------------------------------- read exactly

@pytest.mark.parametrize("bin_um", [16, 8])
def test_hd_bins_are_read_exactly_and_embedded_from_the_slide(tmp_path, bin_um):
    written, img = write_hd(tmp_path / "raw")
    w = written[bin_um]
    vocab = tmp_path / "gene_info.csv"
    vocab.write_text("HGNC_gene\n" + "".join(g + "\n" for g in GENES if g not in NOT_IN_VOCAB))
    flags = ("--vocab", vocab) if bin_um == 16 else ("--bin-um", "8", "--image", tmp_path / "raw" / "S1" / "he.tif")
    p = prepare_hd(tmp_path / "raw", tmp_path / "out", *flags, check=True)
    with h5py.File(tmp_path / "out" / "slices" / "S1.h5", "r") as f:
        genes = decode(f["genes"])
        assert decode(f["barcode"]) == w["barcodes"]
        np.testing.assert_array_equal(f["counts"][()], w["counts"][:, [GENES.index(g) for g in genes]])
        np.testing.assert_array_equal(f["expr"][()], np.log2(f["counts"][()] + 1).astype(np.float32))
        np.testing.assert_array_equal(f["pixel"][()], w["pixel"].astype(np.float32))
        np.testing.assert_array_equal(f["array"][()], w["array"])
        attrs = dict(f.attrs)
        assert "img" not in f                            # patches are cropped from the slide when embedded
        assert f["thumbnail"].shape[2] == 3
    assert attrs["pixel_size_um"] == UM and attrs["pixel_size_source"] == "metadata"
    assert "microns_per_pixel" in attrs["pixel_size_origin"]
    assert attrs["bin_size_um"] == bin_um and attrs["spot_diameter_px"] == bin_um / UM
    assert "spot_diameter_um" not in attrs
    assert attrs["patch_px_native"] == 224 and attrs["slide"] == str(tmp_path / "raw" / "S1" / "he.tif")
    expected = [g for g in GENES if not g.startswith(("MT-", "RPL"))]
    if bin_um == 16:                                     # unmatched genes are counted on one line and all listed
        assert "3 of 35 measured genes are not in it" in p.stdout and "AC0001.1, LINC9999, OLD1" in p.stdout
        assert (tmp_path / "out" / "genes_not_in_vocab.txt").read_text().split() == NOT_IN_VOCAB
        expected = [g for g in expected if g not in NOT_IN_VOCAB]
        with h5py.File(tmp_path / "out" / "slices" / "S1.h5", "r") as f:
            assert f["gene_ids"][()].tolist() == [GENES.index(g) + 1 for g in genes]  # vocabulary row + 1
    assert sorted(genes) == sorted(expected)
    if bin_um == 16:
        return
    run_script("extract_features.py", "--data", tmp_path / "out", "--encoder", "stain", "--batch-size", "16")
    with h5py.File(tmp_path / "out" / "slices" / "S1.h5", "r") as f:
        patches = X.SlidePatches(f, "S1")[:]
    with h5py.File(tmp_path / "out" / "features" / "stain" / "S1.h5", "r") as e:
        assert e["embeddings"].shape == (len(w["barcodes"]), 74)
        np.testing.assert_allclose(e["embeddings"][:5], X.StainEncoder()(patches[:5]), rtol=1e-6)
    c = np.round(w["pixel"]).astype(int)
    for i in (0, len(c) - 1):                            # a 224 px patch centred on the bin
        np.testing.assert_array_equal(patches[i, 112, 112], img[c[i, 1], c[i, 0]])
    a, b = next((i, j) for i in range(len(c)) for j in range(len(c))
                if (w["array"][j] - w["array"][i]).tolist() == [1, 0])  # neighbouring bins share most of their patch
    dx, dy = c[b] - c[a]
    assert 0 < dx < 224 * 0.1 and 0 < dy < 224 * 0.1
    np.testing.assert_array_equal(patches[b, :224 - dy, :224 - dx], patches[a, dy:, dx:])


def test_hd_counts_stay_sparse_until_the_panel_is_chosen(tmp_path):
    written, _ = write_hd(tmp_path / "raw", bins=(16,))
    rs, = V.read_visium_hd(str(tmp_path / "raw"), 16, False)
    assert R.is_sparse(rs.counts) and rs.counts.nnz == np.count_nonzero(written[16]["counts"])
    dense = R.RawSlice(**{**rs.__dict__, "counts": rs.counts.toarray()})
    genes = [g for g in GENES if g.startswith("GENE")]
    for got, want in zip(P.gene_moments([rs, rs], genes), P.gene_moments([dense, dense], genes)):
        np.testing.assert_allclose(got, want, rtol=1e-5)  # HMHVG's mean and std without a dense matrix
    assert P.select_genes([rs], None, 10, None) == P.select_genes([dense], None, 10, None)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        P.write_sparse_counts(f, rs.counts, [GENES.index(g) for g in genes])
        np.testing.assert_array_equal(f["counts"][()], written[16]["counts"][:, [GENES.index(g) for g in genes]])


# ----------------------------------------------------------------------------- bad inputs

def test_missing_bin_is_refused(tmp_path):
    write_hd(tmp_path / "raw", bins=(16,))
    p = prepare_hd(tmp_path / "raw", tmp_path / "out", "--bin-um", "8")
    assert_user_error(p, "square_008um: missing", "square_002um, square_016um", "--bin-um 16")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("flags", [("--dataset", "visium", "--bin-um", "16"),
                                   ("--dataset", "visium-hd", "--grid", "square"),
                                   ("--dataset", "demo", "--spot-pitch-um", "8")])
def test_a_flag_of_another_layout_is_refused(tmp_path, flags):
    write_hd(tmp_path / "raw", bins=(16,))              # not silently ignored: the user meant something by it
    p = run_script("prepare_data.py", *flags, "--raw", tmp_path / "raw", "--out", tmp_path / "out", check=False)
    assert_user_error(p, flags[2], f"not {flags[1]}")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("damage", ["no pixel columns", "not parquet"])
def test_parquet_without_pixel_columns_is_refused(tmp_path, damage):
    write_hd(tmp_path / "raw", bins=(16,))
    path = tmp_path / "raw" / "S1" / "outs" / "binned_outputs" / "square_016um" / "spatial" / "tissue_positions.parquet"
    if damage == "not parquet":
        path.write_text("barcode,array_row\ns_016um_00000_00000-1,0\n")
    else:
        pd.read_parquet(path).drop(columns=["pxl_row_in_fullres", "pxl_col_in_fullres"]).to_parquet(path)
    p = prepare_hd(tmp_path / "raw", tmp_path / "out")
    words = ("not a Parquet file",) if damage == "not parquet" else ("pxl_row_in_fullres, pxl_col_in_fullres",
                                                                     "array_row")
    assert_user_error(p, "tissue_positions.parquet", *words)
    assert_nothing_written(tmp_path / "out")


def test_bin_size_contradicting_the_folder_is_refused(tmp_path):
    write_hd(tmp_path / "raw", bins=(16,))
    sf = tmp_path / "raw" / "S1" / "outs" / "binned_outputs" / "square_016um" / "spatial" / "scalefactors_json.json"
    sf.write_text(json.dumps({**json.loads(sf.read_text()), "bin_size_um": 8.0}))
    p = prepare_hd(tmp_path / "raw", tmp_path / "out")
    assert_user_error(p, "scalefactors_json.json", "bin_size_um 8", "square_016um", "16 µm")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("where", ["flag", "metadata"])
def test_pixel_size_disagreeing_with_the_bins_is_refused(tmp_path, where):
    write_hd(tmp_path / "raw", bins=(16,))
    sf = tmp_path / "raw" / "S1" / "outs" / "binned_outputs" / "square_016um" / "spatial" / "scalefactors_json.json"
    if where == "metadata":
        sf.write_text(json.dumps({**json.loads(sf.read_text()), "microns_per_pixel": 0.6}))
    p = prepare_hd(tmp_path / "raw", tmp_path / "out", *(("--pixel-size", "0.6") if where == "flag" else ()))
    assert_user_error(p, "pixel size 0.6 µm/px", f"({where}", "0.5 µm/px", "16 µm bins 32 px apart", "20%")
    assert_nothing_written(tmp_path / "out")
    if where == "flag":                                  # within 10 %: the user's value, said to be theirs
        prepare_hd(tmp_path / "raw", tmp_path / "ok", "--pixel-size", "0.52", check=True)
        with h5py.File(tmp_path / "ok" / "slices" / "S1.h5", "r") as f:
            assert f.attrs["pixel_size_um"] == 0.52 and f.attrs["pixel_size_source"] == "flag"


# ----------------------------------------------------------------------------- bin grids and provenance

def tissue_slide(path, um=2.0):
    """A pyramidal TIFF at `um` µm/px: 320 µm of pink tissue with purple nuclei in the middle of pale glass."""
    rng = np.random.default_rng(0)
    img = np.clip(np.array([226, 212, 228]) + rng.normal(0, 3, (400, 400, 3)), 0, 255)
    block = np.clip(np.array([215, 120, 175]) + rng.normal(0, 12, (160, 160, 3)), 0, 255)
    block[rng.random((160, 160)) < 0.15] = (90, 50, 140)
    img[120:280, 120:280] = block
    R.write_slide_tiff(str(path), img.astype(np.uint8), um)


def training_data(root):
    """What provenance reads of a training data folder: its prepare.json and one slice's attributes."""
    os.makedirs(root / "slices")
    json.dump({"dataset": "visium", "raw": "/data/visium", "n_top": 300, "vocab": "gene_info.csv",
               "test_slices": "V1"}, open(root / "prepare.json", "w"))
    with h5py.File(root / "slices" / "V2.h5", "w") as f:
        f.attrs.update(dataset="visium", spot_diameter_um=55.0, spot_diameter_px=110.0, pixel_size_um=0.5)


@pytest.mark.parametrize("jitter, radius", [(0.0, 37.0), (0.01, 40.0)])  # 40 µm: 5 bins, on the rim of (3, 4)
def test_context_on_a_grid_of_bins_is_the_mean_within_the_radius(jitter, radius):
    """Bins take the FFT path (folds.lattice_sums): its means must be the plain definition's, the spots within the
    radius in µm, itself excluded, on a rotated grid with holes, whose centres may sit off the grid by 1 % of a bin;
    other layouts are not taken for a grid."""
    rng = np.random.default_rng(0)
    col, row = np.meshgrid(np.arange(40), np.arange(30))
    cells = np.stack([col.ravel(), row.ravel()], 1)[rng.random(1200) < 0.8]       # tissue with holes
    turn = np.array([[np.cos(ANGLE), np.sin(ANGLE)], [-np.sin(ANGLE), np.cos(ANGLE)]])
    xy = (cells * 8.0 + rng.normal(0, jitter * 8, cells.shape)) @ turn + 5000.0   # 8 µm bins, far from the origin
    xy = xy.astype(np.float32).astype(np.float64)        # as a slice file stores pixel centres
    lattice = square_lattice(xy)
    assert lattice is not None and np.linalg.svd(lattice.axes, compute_uv=False) == pytest.approx([8, 8], rel=1e-3)
    H = rng.normal(size=(len(xy), 2, 5)).astype(np.float32)   # with dihedral views: [N, 8, D] in files
    got = context_features(H, Geometry(xy, "um", 8.0, 224.0), Context(8, radius, radius / 8), "bins")[..., 5:]
    dist = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    near = (dist <= radius) & ~np.eye(len(xy), dtype=bool)
    want = np.einsum("ij,jvd->ivd", near, H) / near.sum(1)[:, None, None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    hexagonal = np.stack([col.ravel() + 0.5 * (row.ravel() % 2), row.ravel() * np.sqrt(3) / 2], 1) * 100
    jittered = cells * 200.0 + rng.normal(0, 15, cells.shape)   # ST spots: centres found on the image
    assert square_lattice(hexagonal) is None and square_lattice(jittered) is None
    assert square_lattice(np.concatenate([xy, xy[:1]])) is None  # two spots in one cell


def test_bin_grid_without_expression_states_bins_units_and_provenance(tmp_path):
    tissue_slide(tmp_path / "slide.tif")
    run_script("prepare_data.py", "--dataset", "image", "--image", tmp_path / "slide.tif", "--grid", "square",
               "--spot-pitch-um", "8", "--out", tmp_path / "bins")
    with h5py.File(tmp_path / "bins" / "slices" / "slide.h5", "r") as f:
        attrs, pixel, barcodes = dict(f.attrs), f["pixel"][()], f["barcode"][()]
    n = len(barcodes)
    assert attrs["bin_size_um"] == 8 and attrs["spot_diameter_px"] == 4 and attrs["patch_px_native"] == 224
    assert attrs["pixel_size_source"] == "metadata" and "spot_diameter_um" not in attrs
    assert 0.8 * 320 ** 2 / 64 < n < 1.2 * 320 ** 2 / 64  # 8 µm bins tile the tissue
    geom = slice_geometry(tmp_path / "bins", "slide")    # context radii stay in µm: the same tissue as at 100 µm
    assert geom.unit == "um" and geom.pitch == pytest.approx(8)
    ctx = context_features(np.eye(n, dtype=np.float32), geom, Context(6, 105.0, 1.05), "slide")[:, n:]
    inner = np.flatnonzero((np.abs(pixel - 200) < 20).all(1))
    assert np.all(np.abs(1 / ctx[inner].max(1) - np.pi * 105 ** 2 / 64) < 0.05 * np.pi * 105 ** 2 / 64)

    training_data(tmp_path / "train")
    pred = tmp_path / "pred" / "slide.h5"
    os.makedirs(pred.parent)
    with h5py.File(pred, "w") as f:                      # as sample.py writes it: the run names its training data
        out = PredictionFile(f, n, 2, 64)
        out.write(0, np.ones((n, 2), np.float32), np.zeros((n, 2), np.float32))
        out.finish(barcodes, ["A", "B"], K=5,
                   **provenance(tmp_path / "bins", "slide", {"data": str(tmp_path / "train"), "slices": ["V2"]}))
    import anndata
    ad = anndata.read_h5ad(write_anndata(str(pred), str(tmp_path / "bins")))
    sf, prov = ad.uns["spatial"]["slide"]["scalefactors"], ad.uns["prediction"]
    assert sf["spot_diameter_fullres"] == 4 and sf["bin_size_um"] == 8  # squidpy draws 8 µm bins
    assert prov["K"] == 5 and prov["spot_kind"] == "bin" and prov["bin_size_um"] == 8
    assert prov["units"].startswith("log2(count + 1)") and "per 55 µm spot (visium)" in prov["units"]
    assert "8 µm bin" in prov["units_note"] and "55 µm" in prov["units_note"]
    assert "HMHVG" in prov["gene_panel"] and "top-300" in prov["gene_panel"] and "V1" in prov["gene_panel"]
    assert "gene_info.csv" in prov["gene_panel"] and prov["training_data"] == str(tmp_path / "train")
    assert prov["pixel_size_um"] == pytest.approx(2.0) and prov["pixel_size_source"] == "metadata"

"""10x Genomics Space Ranger outputs for prepare_data.py: Visium `outs/` (55 µm spots, CSV positions) and Visium HD
`outs/binned_outputs/square_008um|016um` (square bins, Parquet positions, `microns_per_pixel`), each slice a
readers.RawSlice. Visium HD counts stay a sparse matrix: 600k bins x 18k genes are 43 GB dense."""
import glob
import json
import os

import numpy as np
import pandas as pd
from tqdm import tqdm

from common import UserError, decode
from readers import RawSlice, open_h5

VISIUM_SPOT_UM = 55.0                                    # Visium's spot diameter (100 µm centre to centre)
HD_BINS = (8, 16)                                        # bin sizes read (2 µm bins are smaller than a nucleus)
IMAGE_EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".btf")
HD_COLUMNS = ["barcode", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def read_10x_h5(path, sparse=False):
    """Space Ranger filtered_feature_bc_matrix.h5 (CSC, genes x barcodes) -> barcodes, genes, counts
    (dense float32, or scipy CSR float32 with sparse=True)."""
    with open_h5(path, "Space Ranger's filtered_feature_bc_matrix.h5") as f:
        if "matrix" not in f:
            raise UserError(f"{path}: no 'matrix' group (found {', '.join(f) or 'nothing'}); "
                            "Space Ranger's filtered_feature_bc_matrix.h5 expected, replace the file")
        m = f["matrix"]
        shape = tuple(m["shape"][()])
        from scipy.sparse import csc_matrix
        X = csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=shape).T.tocsr()
        genes = decode(m["features/name"][()])
        kind = (decode(m["features/feature_type"][()]) if "feature_type" in m["features"]
                else ["Gene Expression"] * len(genes))
        barcodes = decode(m["barcodes"][()])
    keep = [i for i, k in enumerate(kind) if k == "Gene Expression"]
    genes = [genes[i] for i in keep]
    first = {}                                           # duplicated symbols: keep the first feature
    for i, g in enumerate(genes):
        first.setdefault(g, i)
    rows = sorted(first.values())
    X = X[:, [keep[i] for i in rows]]
    return barcodes, [genes[i] for i in rows], X.astype(np.float32) if sparse else X.toarray().astype(np.float32)


POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def read_positions(path):
    """Space Ranger spot positions indexed by barcode. tissue_positions.csv has a header row and the older
    tissue_positions_list.csv has none, but users rename one to the other: a header is told by its naming `barcode`."""
    first = pd.read_csv(path, header=None, nrows=1, dtype=str).iloc[0].fillna("").str.strip().tolist()
    pos = pd.read_csv(path) if "barcode" in first else pd.read_csv(path, header=None)
    if "barcode" not in first and pos.shape[1] == len(POSITION_COLUMNS):
        pos.columns = POSITION_COLUMNS
    numeric = POSITION_COLUMNS[2:]
    if "barcode" not in pos or not all(c in pos and pd.api.types.is_numeric_dtype(pos[c]) for c in numeric):
        raise UserError(f"{path}: expected the columns {', '.join(POSITION_COLUMNS)} (with or without a header row), "
                        f"found {pos.shape[1]} columns, first row {','.join(first)}; use Space Ranger's file")
    return pos.set_index("barcode")


def read_scalefactors(path, where):
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; Space Ranger writes it in {where}")
    try:
        with open(path) as f:
            sf = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); use Space Ranger's scalefactors_json.json") from e
    if not isinstance(sf, dict):
        raise UserError(f"{path}: not a JSON object of scale factors; use Space Ranger's scalefactors_json.json")
    return sf


def image_beside(folder):
    """The first image file in `folder`: the full-resolution H&E a user keeps beside outs/."""
    return next((q for q in sorted(glob.glob(os.path.join(folder, "*"))) if q.lower().endswith(IMAGE_EXTENSIONS)), None)


def match_positions(barcodes, pos, allow_unmatched, pos_path, h5):
    """Row of `pos` (indexed by barcode) for each barcode of the matrix -> (rows, matched mask)."""
    if not pos.index.is_unique:
        raise UserError(f"{pos_path}: barcodes listed twice (e.g. {pos.index[pos.index.duplicated()][0]}); "
                        "use Space Ranger's file")
    rows = pos.index.get_indexer(barcodes)
    matched = rows >= 0
    if (~matched).sum() and not allow_unmatched:
        raise UserError(f"{pos_path}: {(~matched).sum()} of {len(barcodes)} barcodes of {h5} have no position; "
                        "pass --allow-unmatched to drop them")
    return rows[matched], matched


def read_visium(raw, allow_unmatched, image=None, pixel_size=None):
    """One or more Space Ranger outs/ folders: <raw>/outs or <raw>/<slice>/outs. The full-resolution
    image is --image (one slice) or an image file beside outs/."""
    outs = sorted(glob.glob(os.path.join(raw, "outs")) + glob.glob(os.path.join(raw, "*", "outs")))
    if not outs:
        raise UserError(f"{raw}: no outs/ folder found; point --raw at a Space Ranger output folder or their parent")
    if image and len(outs) > 1:
        raise UserError(f"--image names one image but {raw} holds {len(outs)} outs/ folders; put each image beside "
                        "its outs/")
    slices = []
    for out in tqdm(outs, desc="read visium", unit="slice"):
        root = os.path.dirname(out)
        name = os.path.basename(os.path.abspath(root))
        h5 = os.path.join(out, "filtered_feature_bc_matrix.h5")
        if not os.path.isfile(h5):
            raise UserError(f"{h5}: missing; Space Ranger writes it in outs/")
        barcodes, genes, X = read_10x_h5(h5)
        pos_new, pos_old = (os.path.join(out, "spatial", "tissue_positions.csv"),
                            os.path.join(out, "spatial", "tissue_positions_list.csv"))
        pos_path = pos_new if os.path.isfile(pos_new) else pos_old
        if not os.path.isfile(pos_path):
            raise UserError(f"{pos_new}: missing (nor tissue_positions_list.csv); Space Ranger writes it in "
                            "outs/spatial/")
        pos = read_positions(pos_path)
        rows, matched = match_positions(barcodes, pos, allow_unmatched, pos_path, h5)
        p = pos.iloc[rows]
        sf_path = os.path.join(out, "spatial", "scalefactors_json.json")
        diam = read_scalefactors(sf_path, "outs/spatial/").get("spot_diameter_fullres")
        geometry = (VISIUM_SPOT_UM / diam, f"55 µm spots {diam:.4g} px wide in {sf_path}") if diam else None
        um, origin = ((pixel_size, ("flag", "--pixel-size")) if pixel_size else
                      (geometry[0], ("estimate", geometry[1])) if geometry else (None, None))
        slices.append(RawSlice(
            name=name, patient=name, barcodes=[b for b, m in zip(barcodes, matched) if m], genes=genes,
            counts=X[matched], array=p[["array_col", "array_row"]].to_numpy(np.int32),
            pixel=p[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float32),
            image=image or image_beside(root), spot_diameter_px=diam, pixel_size_um=um, source=h5,
            pixel_size_from=origin, geometry_um=geometry, spot_diameter_um=VISIUM_SPOT_UM))
    return slices


#################################################################################
#                                 Visium HD                                     #
#################################################################################

def hd_outs(raw):
    """Space Ranger output folders holding binned_outputs/: <raw> itself, <raw>/outs or <raw>/<slice>/outs."""
    if os.path.isdir(os.path.join(raw, "binned_outputs")):
        return [os.path.abspath(raw)]
    outs = glob.glob(os.path.join(raw, "outs")) + glob.glob(os.path.join(raw, "*", "outs"))
    return sorted(os.path.abspath(p) for p in outs if os.path.isdir(os.path.join(p, "binned_outputs")))


def read_parquet_positions(path):
    """tissue_positions.parquet -> positions indexed by barcode, its pixel columns checked."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; Space Ranger writes it in binned_outputs/square_*um/spatial/")
    try:
        pos = pd.read_parquet(path)
    except ImportError as e:                             # pandas reads Parquet through pyarrow
        raise UserError(f"{path}: reading Parquet needs pyarrow ({e}); pip install -r requirements.txt") from e
    except (ValueError, OSError) as e:                   # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: not a Parquet file ({type(e).__name__}: {e}); use Space Ranger's file") from e
    missing = [c for c in HD_COLUMNS if c not in pos]
    wrong = [c for c in HD_COLUMNS[1:] if c in pos and not pd.api.types.is_numeric_dtype(pos[c])]
    if missing or wrong:
        raise UserError(f"{path}: " + (f"no column {', '.join(missing)}" if missing else
                                       f"column {', '.join(wrong)} is not numeric")
                        + f" (found {', '.join(map(str, pos.columns))}); Space Ranger writes {', '.join(HD_COLUMNS)}")
    return pos.set_index("barcode")


def grid_pitch(array, pixel):
    """Full-resolution pixels per array step, from an affine fit pixel ~ array: a rotated or mirrored image
    leaves it unchanged. None when the bins do not span two dimensions."""
    A = np.c_[array.astype(np.float64), np.ones(len(array))]
    if len(A) < 3 or np.linalg.matrix_rank(A) < 3:
        return None
    coef = np.linalg.lstsq(A, pixel.astype(np.float64), rcond=None)[0]  # rows: one column step, one row step, origin
    return float(np.linalg.norm(coef[:2], axis=1).mean())


def hd_bin_folder(out, bin_um):
    binned = os.path.join(out, "binned_outputs")
    folder = os.path.join(binned, f"square_{bin_um:03d}um")
    if not os.path.isdir(folder):
        have = sorted(os.path.basename(p) for p in glob.glob(os.path.join(binned, "square_*um")))
        usable = [b for b in HD_BINS if f"square_{b:03d}um" in have]
        hint = f"choose --bin-um {' or '.join(map(str, usable))}" if usable else "run Space Ranger with 8 or 16 µm bins"
        raise UserError(f"{folder}: missing ({binned} holds {', '.join(have) or 'no square_*um folder'}); {hint}")
    return folder


def hd_pixel_size(sf, sf_path, folder, bin_um, pixel_size):
    """(µm per px, its origin) from --pixel-size or the metadata, after bin_size_um is checked against the folder."""
    if "bin_size_um" in sf and abs(float(sf["bin_size_um"]) - bin_um) > 1e-6:
        raise UserError(f"{sf_path}: bin_size_um {float(sf['bin_size_um']):g} contradicts its folder "
                        f"{os.path.basename(folder)} ({bin_um} µm bins); restore Space Ranger's file for this bin")
    if pixel_size:
        return pixel_size, ("flag", "--pixel-size")
    mpp = sf.get("microns_per_pixel")
    if not isinstance(mpp, (int, float)) or mpp <= 0:
        raise UserError(f"{sf_path}: no positive microns_per_pixel (Space Ranger 3 writes it for Visium HD); "
                        "pass --pixel-size")
    return float(mpp), ("metadata", f"{sf_path} microns_per_pixel")


def read_visium_hd(raw, bin_um, allow_unmatched, image=None, pixel_size=None):
    """Visium HD: <raw>/binned_outputs, <raw>/outs/binned_outputs or <raw>/<slice>/outs/binned_outputs, the
    square_<bin>um folder read as Space Ranger writes it; the full-resolution image is --image or beside outs/."""
    outs = hd_outs(raw)
    if not outs:
        raise UserError(f"{raw}: no binned_outputs/ folder (nor outs/binned_outputs); point --raw at a Visium HD "
                        "Space Ranger output folder or their parent")
    if image and len(outs) > 1:
        raise UserError(f"--image names one image but {raw} holds {len(outs)} Visium HD outputs; put each image "
                        "beside its outs/")
    slices = []
    for out in tqdm(outs, desc="read visium-hd", unit="slice"):
        root = os.path.dirname(out) if os.path.basename(out) == "outs" else out
        name = os.path.basename(root)
        folder = hd_bin_folder(out, bin_um)
        h5 = os.path.join(folder, "filtered_feature_bc_matrix.h5")
        if not os.path.isfile(h5):
            raise UserError(f"{h5}: missing; Space Ranger writes it in each binned_outputs/square_*um/")
        barcodes, genes, X = read_10x_h5(h5, sparse=True)
        pos_path = os.path.join(folder, "spatial", "tissue_positions.parquet")
        pos = read_parquet_positions(pos_path)
        sf_path = os.path.join(folder, "spatial", "scalefactors_json.json")
        sf = read_scalefactors(sf_path, "binned_outputs/square_*um/spatial/")
        um, origin = hd_pixel_size(sf, sf_path, folder, bin_um, pixel_size)
        rows, matched = match_positions(barcodes, pos, allow_unmatched, pos_path, h5)
        p = pos.iloc[rows]
        array = p[["array_col", "array_row"]].to_numpy(np.int32)
        pixel = p[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
        pitch, diam = grid_pitch(array, pixel), sf.get("spot_diameter_fullres")
        geometry = ((bin_um / pitch, f"{bin_um} µm bins {pitch:.4g} px apart in {pos_path}") if pitch else
                    (bin_um / diam, f"{bin_um} µm bins {diam:.4g} px wide in {sf_path}") if diam else None)
        slices.append(RawSlice(
            name=name, patient=name, barcodes=[b for b, m in zip(barcodes, matched) if m], genes=genes,
            counts=X[np.flatnonzero(matched)], array=array, pixel=pixel.astype(np.float32),
            image=image or image_beside(root), spot_diameter_px=bin_um / um, pixel_size_um=um, source=h5,
            pixel_size_from=origin, geometry_um=geometry, bin_size_um=float(bin_um)))
        print(f"{name}: {len(slices[-1].barcodes)} bins of {bin_um} µm, {len(genes)} genes, {X.nnz} non-zero counts "
              f"({um:.4g} µm/px, {origin[0]})")
    return slices

"""Stage 1: raw spatial transcriptomics + H&E -> slice files (DESIGN.md §1, §2).

    python prepare_data.py --dataset demo --out data/demo
    python prepare_data.py --dataset her2st --raw her2st/data --vocab gene_info.csv --out data/her2st

Writes <out>/slices/<slice>.h5 (patches, spot positions, counts, log2(counts+1) of the selected
genes), <out>/genes.txt and, last, <out>/slices.tsv. Gene selection is Stem's HMHVG.
"""
import argparse
import glob
import hashlib
import json
import math
import os
from dataclasses import dataclass

import h5py
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from common import UserError, atomic_h5, decode, run, slice_path, str_array, write_text

Image.MAX_IMAGE_PIXELS = None  # whole-slide images are trusted local files, larger than PIL's bomb guard
WHITE = 255
DROP_PREFIXES = ("MT-", "RPS", "RPL")  # mitochondrial and ribosomal genes (Stem, DESIGN §2)


#################################################################################
#                                 Images                                        #
#################################################################################

class ArrayImage:
    """An RGB image held in memory (JPEG/PNG slides, the demo)."""
    def __init__(self, arr):
        self.arr = arr
        self.size = (arr.shape[1], arr.shape[0])

    def read(self, x0, y0, x1, y1):
        return self.arr[y0:y1, x0:x1]


class TiffImage:
    """Level 0 of a (pyramidal, tiled or striped) TIFF, read region by region: only the tiles or
    strips a patch touches are decoded, so a whole-slide image is never loaded whole."""
    def __init__(self, path):
        import tifffile
        self.tif = tifffile.TiffFile(path)
        self.page = self.tif.pages[0]
        self.size = (self.page.imagewidth, self.page.imagelength)
        self.fh = self.tif.filehandle

    def read(self, x0, y0, x1, y1):
        p = self.page
        out = np.full((y1 - y0, x1 - x0, 3), WHITE, np.uint8)
        if p.is_tiled:
            th, tw = p.tilelength, p.tilewidth
            ntx = math.ceil(p.imagewidth / tw)
            idx = [ty * ntx + tx for ty in range(y0 // th, (y1 - 1) // th + 1) for tx in range(x0 // tw, (x1 - 1) // tw + 1)]
        else:
            rps = min(p.rowsperstrip, p.imagelength)
            idx = list(range(y0 // rps, (y1 - 1) // rps + 1))
        for i in idx:
            self.fh.seek(p.dataoffsets[i])
            seg, pos, shape = p.decode(self.fh.read(p.databytecounts[i]), i, jpegtables=p.jpegtables)
            if seg is None:
                continue
            seg = seg.reshape(shape[1], shape[2], -1)
            seg = np.repeat(seg[..., :1], 3, -1) if seg.shape[-1] < 3 else seg[..., :3]
            sy, sx = pos[2], pos[3]
            ya, yb = max(y0, sy), min(y1, sy + seg.shape[0])
            xa, xb = max(x0, sx), min(x1, sx + seg.shape[1])
            if ya < yb and xa < xb:
                out[ya - y0:yb - y0, xa - x0:xb - x0] = seg[ya - sy:yb - sy, xa - sx:xb - sx]
        return out


def open_image(path):
    """Open a slide image; grayscale, RGBA or palette images are converted to RGB."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: image file not found; check the path or remove the slice's image folder")
    if path.lower().endswith((".tif", ".tiff")):
        return TiffImage(path)
    try:
        with Image.open(path) as im:
            return ArrayImage(np.asarray(im.convert("RGB")))
    except OSError as e:
        raise UserError(f"{path}: cannot read image ({e}); replace the file") from e


def image_size(path):
    """(width, height) from the header only, without decoding pixels."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: image file not found; check the path or remove the slice's image folder")
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile
        with tifffile.TiffFile(path) as t:
            return t.pages[0].imagewidth, t.pages[0].imagelength
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise UserError(f"{path}: cannot read image ({e}); replace the file") from e


def crop_patches(img, centres, side, out_size):
    """Square patches of `side` native pixels centred on each spot (white beyond the border),
    resized to out_size (PIL LANCZOS, as Stem). Patch centre pixel [side//2, side//2] = image
    pixel at the rounded spot centre."""
    W, H = img.size
    out = np.empty((len(centres), out_size, out_size, 3), np.uint8)
    for i, (cx, cy) in enumerate(centres):
        x0, y0 = int(round(cx)) - side // 2, int(round(cy)) - side // 2
        patch = np.full((side, side, 3), WHITE, np.uint8)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, W), min(y0 + side, H)
        if xa < xb and ya < yb:
            patch[ya - y0:yb - y0, xa - x0:xb - x0] = img.read(xa, ya, xb, yb)
        if side != out_size:
            patch = np.asarray(Image.fromarray(patch).resize((out_size, out_size), Image.LANCZOS))
        out[i] = patch
    return out


#################################################################################
#                                 Readers                                       #
#################################################################################

@dataclass
class RawSlice:
    name: str
    patient: str
    barcodes: list
    genes: list
    counts: np.ndarray                 # float32 [N, G_slice] raw counts
    array: np.ndarray                  # int32 [N, 2] (col, row)
    pixel: np.ndarray = None           # float32 [N, 2] (x, y) full-resolution pixels
    image: str = None                  # path of the full-resolution image
    image_array: np.ndarray = None     # in-memory image (demo)
    patches: tuple = None              # (h5 path, row index per spot) of ready HEST patches
    spot_diameter_px: float = None
    pixel_size_um: float = None
    source: str = ""


def check_counts(rs):
    if rs.counts.shape[0] == 0:
        raise UserError(f"{rs.source}: slice {rs.name} has no spots; remove it or fix the file")
    bad_nan, bad_neg = int(np.isnan(rs.counts).sum()), int((rs.counts < 0).sum())
    if bad_nan or bad_neg:
        raise UserError(f"{rs.source}: {bad_nan} NaN and {bad_neg} negative counts; raw counts must be "
                        "non-negative numbers (was the matrix already normalised?)")


def fit_spacing(grid, pixel):
    """Pixels per array unit from a least-squares fit of pixel ~ a + s·grid, both axes."""
    s = [np.polyfit(grid[:, k], pixel[:, k], 1)[0] for k in (0, 1) if len(grid) > 1 and np.ptp(grid[:, k]) > 0]
    return float(np.mean(np.abs(s))) if s else None


def read_her2st(raw, allow_unmatched):
    """Her2ST GitHub layout: ST-cnts/<s>.tsv.gz (spots x genes), ST-spotfiles/<s>_selection.tsv,
    ST-imgs/<patient>/<s>/*.jpg. Spots are joined on "<x>x<y>"."""
    cnt = {os.path.basename(p)[:-len(".tsv.gz")]: p for p in glob.glob(os.path.join(raw, "ST-cnts", "*.tsv.gz"))}
    spt = {os.path.basename(p)[:-len("_selection.tsv")]: p for p in glob.glob(os.path.join(raw, "ST-spotfiles", "*_selection.tsv"))}
    if not cnt and not spt:
        raise UserError(f"{raw}: no ST-cnts/*.tsv.gz or ST-spotfiles/*_selection.tsv; point --raw at the Her2ST data folder")
    for name in sorted(set(cnt) ^ set(spt)):
        missing = os.path.join(raw, "ST-cnts", f"{name}.tsv.gz") if name not in cnt else \
            os.path.join(raw, "ST-spotfiles", f"{name}_selection.tsv")
        raise UserError(f"{missing}: missing for slice {name}; restore the file or remove the slice's other file")
    slices = []
    for name in tqdm(sorted(cnt), desc="read her2st", unit="slice"):
        df = pd.read_csv(cnt[name], sep="\t", index_col=0)
        spots = pd.read_csv(spt[name], sep="\t")
        if not {"x", "y", "pixel_x", "pixel_y"} <= set(spots.columns):
            raise UserError(f"{spt[name]}: needs columns x, y, pixel_x, pixel_y; found {', '.join(spots.columns)}")
        spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
        barcodes = [str(b) for b in df.index]
        matched = [b in spots.index for b in barcodes]
        n_bad = len(barcodes) - sum(matched)
        if n_bad and not allow_unmatched:
            raise UserError(f"{spt[name]}: {n_bad} of {len(barcodes)} spots of {cnt[name]} have no spot-file row; "
                            "fix the spot file or pass --allow-unmatched to drop them")
        df = df[matched]
        sp = spots.loc[df.index]
        imgs = sorted(glob.glob(os.path.join(raw, "ST-imgs", name[0], name, "*")))
        imgs = [p for p in imgs if p.lower().endswith((".jpg", ".jpeg", ".png", ".tif", ".tiff"))]
        if os.path.isdir(os.path.join(raw, "ST-imgs", name[0], name)) and not imgs:
            raise UserError(f"{os.path.join(raw, 'ST-imgs', name[0], name)}: image folder holds no image; "
                            "add the slice's H&E image or remove the empty folder")
        grid = sp[["new_x", "new_y"]].to_numpy(float) if "new_x" in sp else sp[["x", "y"]].to_numpy(float)
        pixel = sp[["pixel_x", "pixel_y"]].to_numpy(np.float32)
        s = fit_spacing(grid, pixel)                      # ST: spot pitch 200 µm, spot diameter 100 µm
        slices.append(RawSlice(
            name=name, patient=name[0], barcodes=list(df.index), genes=[str(g) for g in df.columns],
            counts=df.to_numpy(np.float32), array=sp[["x", "y"]].to_numpy(np.int32), pixel=pixel,
            image=imgs[0] if imgs else None, spot_diameter_px=s / 2 if s else None,
            pixel_size_um=200 / s if s else None, source=cnt[name]))
    return slices


def read_10x_h5(path):
    """Space Ranger filtered_feature_bc_matrix.h5 (CSC, genes x barcodes) -> barcodes, genes, dense counts."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        shape = tuple(m["shape"][()])
        from scipy.sparse import csc_matrix
        X = csc_matrix((m["data"][()], m["indices"][()], m["indptr"][()]), shape=shape).T.tocsr()
        genes = decode(m["features/name"][()])
        kind = decode(m["features/feature_type"][()]) if "feature_type" in m["features"] else ["Gene Expression"] * len(genes)
        barcodes = decode(m["barcodes"][()])
    keep = [i for i, k in enumerate(kind) if k == "Gene Expression"]
    genes = [genes[i] for i in keep]
    first = {}                                           # duplicated symbols: keep the first feature
    for i, g in enumerate(genes):
        first.setdefault(g, i)
    rows = sorted(first.values())
    return barcodes, [genes[i] for i in rows], X[:, [keep[i] for i in rows]].toarray().astype(np.float32)


def read_visium(raw, allow_unmatched, image=None):
    """One or more Space Ranger outs/ folders: <raw>/outs or <raw>/<slice>/outs. The full-resolution
    image is --image (one slice) or an image file beside outs/."""
    outs = sorted(glob.glob(os.path.join(raw, "outs")) + glob.glob(os.path.join(raw, "*", "outs")))
    if not outs:
        raise UserError(f"{raw}: no outs/ folder found; point --raw at a Space Ranger output folder or their parent")
    if image and len(outs) > 1:
        raise UserError(f"--image names one image but {raw} holds {len(outs)} outs/ folders; put each image beside its outs/")
    slices = []
    for out in tqdm(outs, desc="read visium", unit="slice"):
        root = os.path.dirname(out)
        name = os.path.basename(os.path.abspath(root))
        h5 = os.path.join(out, "filtered_feature_bc_matrix.h5")
        if not os.path.isfile(h5):
            raise UserError(f"{h5}: missing; Space Ranger writes it in outs/")
        barcodes, genes, X = read_10x_h5(h5)
        pos_new, pos_old = os.path.join(out, "spatial", "tissue_positions.csv"), os.path.join(out, "spatial", "tissue_positions_list.csv")
        cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
        if os.path.isfile(pos_new):
            pos = pd.read_csv(pos_new)
        elif os.path.isfile(pos_old):
            pos = pd.read_csv(pos_old, header=None, names=cols)
        else:
            raise UserError(f"{pos_new}: missing (nor tissue_positions_list.csv); Space Ranger writes it in outs/spatial/")
        pos = pos.set_index("barcode")
        matched = np.array([b in pos.index for b in barcodes])
        if (~matched).sum() and not allow_unmatched:
            raise UserError(f"{pos_new}: {(~matched).sum()} of {len(barcodes)} barcodes of {h5} have no position; "
                            "pass --allow-unmatched to drop them")
        barcodes = [b for b, m in zip(barcodes, matched) if m]
        p = pos.loc[barcodes]
        sf_path = os.path.join(out, "spatial", "scalefactors_json.json")
        if not os.path.isfile(sf_path):
            raise UserError(f"{sf_path}: missing; Space Ranger writes it in outs/spatial/")
        with open(sf_path) as f:
            sf = json.load(f)
        img = image or next((q for q in sorted(glob.glob(os.path.join(root, "*")))
                             if q.lower().endswith((".tif", ".tiff", ".jpg", ".jpeg", ".png", ".btf"))), None)
        diam = sf.get("spot_diameter_fullres")
        slices.append(RawSlice(
            name=name, patient=name, barcodes=barcodes, genes=genes, counts=X[matched],
            array=p[["array_col", "array_row"]].to_numpy(np.int32),
            pixel=p[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float32),
            image=img, spot_diameter_px=diam, pixel_size_um=55.0 / diam if diam else None, source=h5))  # Visium spot: 55 µm
    return slices


def _h5ad_index(group):
    key = group.attrs.get("_index", "_index")
    return decode(group[key][()])


def _h5ad_matrix(node):
    if isinstance(node, h5py.Dataset):
        return node[()].astype(np.float32)
    from scipy.sparse import csc_matrix, csr_matrix
    kind = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", "csr_matrix"))
    kind = kind.decode() if isinstance(kind, bytes) else kind
    cls = csc_matrix if "csc" in kind else csr_matrix
    return cls((node["data"][()], node["indices"][()], node["indptr"][()]), shape=tuple(node.attrs["shape"])).toarray().astype(np.float32)


def read_hest(raw, allow_unmatched):
    """HEST-1k: st/<id>.h5ad (read with h5py) + patches/<id>.h5 (joined by barcode) or wsis/<id>.tif."""
    ids = sorted(os.path.basename(p)[:-len(".h5ad")] for p in glob.glob(os.path.join(raw, "st", "*.h5ad")))
    if not ids:
        raise UserError(f"{raw}: no st/*.h5ad; point --raw at a HEST-1k download folder")
    slices = []
    for sid in tqdm(ids, desc="read hest", unit="slice"):
        path = os.path.join(raw, "st", f"{sid}.h5ad")
        with h5py.File(path, "r") as f:
            X = _h5ad_matrix(f["X"])
            genes, barcodes = _h5ad_index(f["var"]), _h5ad_index(f["obs"])
            spatial = f["obsm/spatial"][()].astype(np.float32)
            obs = f["obs"]
            array = np.stack([obs["array_col"][()], obs["array_row"][()]], 1).astype(np.int32) \
                if "array_col" in obs and "array_row" in obs else np.round(spatial).astype(np.int32)
            sf = "uns/spatial/ST/scalefactors/spot_diameter_fullres"
            diam = float(f[sf][()]) if sf in f else None
        meta_path = os.path.join(raw, "metadata", f"{sid}.json")
        meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
        rs = RawSlice(name=sid, patient=str(meta.get("patient") or sid), barcodes=barcodes, genes=genes, counts=X,
                      array=array, pixel=spatial, spot_diameter_px=diam,
                      pixel_size_um=meta.get("pixel_size_um_estimated"), source=path)
        patch_h5, wsi = os.path.join(raw, "patches", f"{sid}.h5"), os.path.join(raw, "wsis", f"{sid}.tif")
        if os.path.isfile(patch_h5):
            with h5py.File(patch_h5, "r") as f:
                pb = {b: i for i, b in enumerate(decode(f["barcode"][()]))}
            rows = np.array([pb.get(b, -1) for b in barcodes])
            keep = rows >= 0
            if (~keep).sum():                            # HEST drops spots off the slide or with < 15 % tissue
                print(f"{sid}: {(~keep).sum()} of {len(keep)} spots have no HEST patch and are dropped")
                rs.barcodes = [b for b, k in zip(barcodes, keep) if k]
                rs.counts, rs.array, rs.pixel = rs.counts[keep], rs.array[keep], rs.pixel[keep]
            rs.patches = (patch_h5, rows[keep])
        elif os.path.isfile(wsi):
            rs.image = wsi
        slices.append(rs)
    return slices


#################################################################################
#                                 Demo dataset                                  #
#################################################################################

# compartment: (base RGB, nucleus RGB, nuclei per 10k px, nucleus radius px)
DEMO_TISSUE = {"tumour": ((200, 150, 205), (70, 30, 110), 28, 6), "stroma": ((235, 160, 195), (120, 60, 140), 6, 3),
               "immune": ((190, 150, 200), (40, 20, 90), 60, 3), "adipose": ((248, 244, 248), (160, 110, 170), 1, 2)}


def demo_slice(k, n_genes=400, grid=18, pitch=100, margin=150):
    """A synthetic slice whose tissue compartments (Voronoi blobs) differ in colour and texture
    and drive compartment-specific expression programs. Deterministic in k."""
    rng = np.random.default_rng(1000 + k)
    side = 2 * margin + (grid - 1) * pitch
    seeds = rng.uniform(0, side, (10, 2))
    kinds = np.array([i % 4 for i in range(10)])[rng.permutation(10)]
    yy, xx = np.mgrid[0:side, 0:side]
    lab = kinds[np.argmin(((xx[..., None] - seeds[:, 0]) ** 2 + (yy[..., None] - seeds[:, 1]) ** 2), -1)]
    comps = list(DEMO_TISSUE.values())
    img = np.array([c[0] for c in comps], np.float32)[lab]
    for ci, (_, nuc, density, r) in enumerate(comps):  # nuclei as filled discs
        n = int(density * (lab == ci).sum() / 1e4)
        cand = rng.integers(r, side - r, (n * 2, 2))
        cand = cand[lab[cand[:, 1], cand[:, 0]] == ci][:n]
        dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
        disc = dx ** 2 + dy ** 2 <= r * r
        for x, y in cand:
            img[y - r:y + r + 1, x - r:x + r + 1][disc] = nuc
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    cx, cy = np.meshgrid(np.arange(grid), np.arange(grid))
    array = np.stack([cx.ravel(), cy.ravel()], 1).astype(np.int32)
    pixel = (margin + array * pitch + rng.normal(0, 1.5, array.shape)).astype(np.float32)
    frac = np.stack([np.bincount(lab[int(y) - 27:int(y) + 28, int(x) - 27:int(x) + 28].ravel(), minlength=4) for x, y in pixel])
    frac = frac / frac.sum(1, keepdims=True)
    prog_rng = np.random.default_rng(7)                  # programs shared by all slices
    base = prog_rng.lognormal(0.0, 1.0, n_genes)
    progs = np.tile(base, (4, 1))
    for ci in range(4):                                  # 40 markers per compartment, 3-12x up
        progs[ci, ci * 40 + 20:(ci + 1) * 40 + 20] *= prog_rng.uniform(3, 12, 40)
    mu = frac @ progs * rng.lognormal(0, 0.25, (len(pixel), 1))  # library-size noise
    counts = rng.poisson(mu).astype(np.float32)
    genes = ["MT-CO1", "MT-ND1", "RPL3", "RPS6"] + [f"GENE{i:03d}" for i in range(4, n_genes)]
    tissue = lab[pixel[:, 1].astype(int), pixel[:, 0].astype(int)] != 3
    keep = tissue | (rng.random(len(pixel)) < 0.3)       # mostly on-tissue spots, as a real array
    return RawSlice(name=f"demo{k + 1}", patient=f"P{k // 2 + 1}", barcodes=[f"{x}x{y}" for x, y in array[keep]],
                    genes=genes, counts=counts[keep], array=array[keep], pixel=pixel[keep], image_array=img,
                    spot_diameter_px=55.0, pixel_size_um=1.0, source="demo")


#################################################################################
#                               Gene selection                                  #
#################################################################################

def read_vocab(path):
    """CellFM gene_info.csv: token id = row index + 1 (anchors §2.1)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: vocabulary file not found; pass CellFM's csv/gene_info.csv")
    df = pd.read_csv(path)
    col = next((c for c in ("HGNC_gene", "gene_name", "gene", "symbol") if c in df.columns), None)
    if col is None:
        raise UserError(f"{path}: no HGNC_gene column (found {', '.join(map(str, df.columns[:6]))}); "
                        "pass CellFM's csv/gene_info.csv, whose rows give the token ids")
    return {str(g): i + 1 for i, g in enumerate(df[col])}


def read_aliases(path):
    df = pd.read_csv(path, sep=None, engine="python")
    if df.shape[1] < 2:
        raise UserError(f"{path}: an alias table needs two columns, old symbol and new symbol")
    return dict(zip(df.iloc[:, 0].astype(str), df.iloc[:, 1].astype(str)))


def apply_aliases(rs, aliases):
    have = set(rs.genes)
    rs.genes = [aliases[g] if g in aliases and aliases[g] not in have else g for g in rs.genes]


def select_genes(slices, vocab, n_top, select_from):
    """HMHVG: genes in every slice (∩ vocabulary), minus MT-/RPS/RPL, then top-N by mean ∩ top-N by
    std of raw counts over all spots of the selection slices (Stem; sorted by name)."""
    genes = set(slices[0].genes).intersection(*(s.genes for s in slices[1:]))
    print(f"genes: {len(genes)} in all {len(slices)} slices", end="")
    if vocab is not None:
        genes &= vocab.keys()
        print(f" -> {len(genes)} in the vocabulary", end="")
    genes = sorted(g for g in genes if not g.upper().startswith(DROP_PREFIXES))
    print(f" -> {len(genes)} without MT-/RPS/RPL", end="")
    sel = [s for s in slices if s.name in select_from] if select_from else slices
    X = np.concatenate([s.counts[:, _indexer(s.genes, genes)] for s in sel])
    top_mean = set(np.argsort(-X.mean(0), kind="stable")[:n_top])
    top_std = set(np.argsort(-X.std(0), kind="stable")[:n_top])
    chosen = [genes[i] for i in sorted(top_mean & top_std)]
    print(f" -> {len(chosen)} in top-{n_top} mean ∩ top-{n_top} std over {len(sel)} slices")
    if not chosen:
        raise UserError("no gene survives selection; raise --n-top or check --vocab / --aliases")
    return chosen


def _indexer(have, want):
    pos = {g: i for i, g in enumerate(have)}
    return [pos[g] for g in want]


#################################################################################
#                                  Writing                                      #
#################################################################################

def check_image(rs):
    """Before anything is written: the image exists and every spot centre lies on it."""
    if rs.image is None or rs.pixel is None:
        return
    W, H = image_size(rs.image)
    out = (rs.pixel[:, 0] < 0) | (rs.pixel[:, 1] < 0) | (rs.pixel[:, 0] >= W) | (rs.pixel[:, 1] >= H)
    if out.any():
        raise UserError(f"{rs.image}: {int(out.sum())} of {len(out)} spot centres of slice {rs.name} lie outside the "
                        f"{W}x{H} image; is it the full-resolution image of this slice?")


def write_slice(path, rs, genes, vocab, patch_size, settings):
    cols = _indexer(rs.genes, genes)
    counts = rs.counts[:, cols]
    side = max(224, int(math.ceil(rs.spot_diameter_px or 0)))  # Stem: max(224 px, spot diameter) native pixels
    img = None
    if rs.image_array is not None or rs.image is not None:
        source = ArrayImage(rs.image_array) if rs.image_array is not None else open_image(rs.image)
        img = crop_patches(source, rs.pixel, side, patch_size)
    elif rs.patches is not None:
        with h5py.File(rs.patches[0], "r") as f:
            order = np.argsort(rs.patches[1])
            raw = f["img"][np.sort(rs.patches[1])][np.argsort(order)]
        side = raw.shape[1]
        img = raw if side == patch_size else np.stack(
            [np.asarray(Image.fromarray(p).resize((patch_size, patch_size), Image.LANCZOS)) for p in raw])
    with atomic_h5(path) as f:
        if img is not None:
            f.create_dataset("img", data=img, chunks=(1, patch_size, patch_size, 3))
        f["barcode"] = str_array(rs.barcodes)
        if rs.pixel is not None:
            f["pixel"] = rs.pixel.astype(np.float32)
        f["array"] = rs.array.astype(np.int32)
        f["counts"] = counts
        f["expr"] = np.log2(counts + 1).astype(np.float32)  # Stem/HINGE target: log2(count + 1), no library size
        f["genes"] = str_array(genes)
        f["gene_ids"] = np.array([vocab[g] for g in genes] if vocab else np.zeros(len(genes)), np.int64)
        f.attrs.update(dataset=settings["dataset"], slice=rs.name, patient=rs.patient, source=rs.source,
                       patch_px_native=side, settings=settings["hash"])
        if rs.pixel_size_um:
            f.attrs["pixel_size_um"] = float(rs.pixel_size_um)


def check_out_dir(out, settings, overwrite):
    """Refuse an output folder that already holds another dataset or another gene selection."""
    manifest = os.path.join(out, "prepare.json")
    if os.path.isfile(manifest) and not overwrite:
        old = json.load(open(manifest))
        if old.get("dataset") != settings["dataset"] or old.get("hash") != settings["hash"]:
            raise UserError(f"{out} already holds dataset {old.get('dataset')!r} prepared with other settings "
                            f"({manifest}); choose another --out or pass --overwrite")
    elif os.path.isdir(os.path.join(out, "slices")) and os.listdir(os.path.join(out, "slices")) and not overwrite \
            and not os.path.isfile(manifest):
        raise UserError(f"{out}/slices holds files this script did not write; choose another --out or pass --overwrite")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["demo", "her2st", "visium", "hest"], default="demo",
                   help="raw layout: demo (synthetic, no input), her2st (GitHub layout), visium (Space Ranger outs/), hest (HEST-1k)")
    p.add_argument("--raw", help="raw data folder (not used for demo)")
    p.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    p.add_argument("--image", help="visium: full-resolution H&E image when --raw holds one outs/ folder")
    p.add_argument("--vocab", help="CellFM gene_info.csv: keep only vocabulary genes and store their token ids")
    p.add_argument("--aliases", help="optional table old symbol -> current symbol, applied before the vocabulary")
    p.add_argument("--n-top", type=int, default=300, help="N of HMHVG: top-N by mean ∩ top-N by std (default 300)")
    p.add_argument("--select-from", help="comma-separated slices used for gene selection (default: all); keeps test slices out")
    p.add_argument("--patch-size", type=int, default=224, help="stored patch side in pixels (default 224)")
    p.add_argument("--allow-unmatched", action="store_true", help="drop spots that have counts but no position instead of failing")
    p.add_argument("--overwrite", action="store_true", help="rewrite complete slice files and replace another dataset in --out")
    a = p.parse_args()

    if a.dataset != "demo" and not (a.raw and os.path.isdir(a.raw)):
        raise UserError(f"--raw {a.raw}: not a folder; --dataset {a.dataset} needs the raw data folder")
    vocab = read_vocab(a.vocab) if a.vocab else None
    aliases = read_aliases(a.aliases) if a.aliases else {}
    select_from = set(a.select_from.split(",")) if a.select_from else None
    settings = {"dataset": a.dataset, "raw": os.path.abspath(a.raw) if a.raw else None, "n_top": a.n_top,
                "vocab": os.path.basename(a.vocab) if a.vocab else None, "aliases": bool(a.aliases),
                "select_from": sorted(select_from) if select_from else None, "patch_size": a.patch_size,
                "allow_unmatched": a.allow_unmatched}
    settings["hash"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    check_out_dir(a.out, settings, a.overwrite)

    if a.dataset == "demo":
        slices = [demo_slice(k) for k in range(4)]
    elif a.dataset == "her2st":
        slices = read_her2st(a.raw, a.allow_unmatched)
    elif a.dataset == "visium":
        slices = read_visium(a.raw, a.allow_unmatched, a.image)
    else:
        slices = read_hest(a.raw, a.allow_unmatched)
    if select_from and not select_from <= {s.name for s in slices}:
        raise UserError(f"--select-from names unknown slices: {', '.join(sorted(select_from - {s.name for s in slices}))}")
    for rs in slices:
        check_counts(rs)
        apply_aliases(rs, aliases)
        check_image(rs)
    genes = select_genes(slices, vocab, a.n_top, select_from)

    write_text(os.path.join(a.out, "prepare.json"), json.dumps(settings, indent=1) + "\n")
    write_text(os.path.join(a.out, "genes.txt"), "".join(g + "\n" for g in genes))
    for rs in tqdm(slices, desc="write slices", unit="slice"):
        path = slice_path(a.out, rs.name)
        if not a.overwrite and os.path.isfile(path):
            with h5py.File(path, "r") as f:
                if f.attrs.get("settings") == settings["hash"]:
                    continue
        write_slice(path, rs, genes, vocab, a.patch_size, settings)
    has_img = {rs.name: rs.image is not None or rs.image_array is not None or rs.patches is not None for rs in slices}
    rows = [f"{rs.name}\t{rs.patient}\t{len(rs.barcodes)}\t{int(has_img[rs.name])}\n" for rs in slices]
    write_text(os.path.join(a.out, "slices.tsv"), "slice\tpatient\tn_spots\thas_image\n" + "".join(rows))
    print(f"wrote {len(slices)} slices ({sum(has_img.values())} with images), {len(genes)} genes -> {a.out}")


if __name__ == "__main__":
    run(main)

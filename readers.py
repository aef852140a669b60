"""Reading raw inputs for prepare_data.py: slide images region by region, and one reader per
dataset layout (Her2ST, HEST-1k, image-only slides, the synthetic demo; 10x Visium and Visium HD
are in visium.py), each returning RawSlice records that prepare_data.py selects genes from and
writes. extract_features.py crops the patches of slides without spatial data here too, as
prepare_data.py crops stored ones.
"""
import glob
import json
import math
import os
from dataclasses import dataclass

import h5py
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from common import UserError, atomic_path, decode

Image.MAX_IMAGE_PIXELS = None  # whole-slide images are trusted local files, larger than PIL's bomb guard
WHITE = 255


#################################################################################
#                                 Images                                        #
#################################################################################

class ArrayImage:
    """An RGB image held in memory (JPEG/PNG slides, the demo). Their dpi tags are unreliable (JPEG
    writes 72 by default), so they carry no pixel size."""
    pixel_size_um = None

    def __init__(self, arr):
        self.arr = arr
        self.size = (arr.shape[1], arr.shape[0])

    def read(self, x0, y0, x1, y1):
        return self.arr[y0:y1, x0:x1]

    def overview(self, max_side):
        f = max(1, math.ceil(max(self.size) / max_side))
        return np.asarray(Image.fromarray(self.arr).reduce(f)), 1 / f


class TiffImage:
    """Level 0 of a TIFF that OpenSlide cannot open (striped, or tiled without a pyramid it knows),
    read region by region: only the tiles or strips a patch touches are decoded."""
    def __init__(self, path):
        import tifffile
        self.tif = tifffile.TiffFile(path)
        self.page = self.tif.pages[0]
        self.size = (self.page.imagewidth, self.page.imagelength)
        self.fh = self.tif.filehandle
        tags = self.page.tags
        unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 1
        um = {2: 25400.0, 3: 10000.0}.get(int(unit))      # µm per inch / per centimetre; 1 = no unit
        xres = tags["XResolution"].value if "XResolution" in tags else None
        self.pixel_size_um = um * xres[1] / xres[0] if um and xres and xres[0] else None

    def read(self, x0, y0, x1, y1):
        p = self.page
        out = np.full((y1 - y0, x1 - x0, 3), WHITE, np.uint8)
        if p.is_tiled:
            th, tw = p.tilelength, p.tilewidth
            ntx = math.ceil(p.imagewidth / tw)
            idx = [ty * ntx + tx for ty in range(y0 // th, (y1 - 1) // th + 1)
                   for tx in range(x0 // tw, (x1 - 1) // tw + 1)]
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

    def overview(self, max_side):
        """Block means of level 0, read in bands of rows so that memory holds one band at a time."""
        W, H = self.size
        f = max(1, math.ceil(max(W, H) / max_side))
        h, w, band = H // f * f, W // f * f, f * max(1, 256 // f)
        return np.concatenate([block_mean(self.read(0, y, w, min(y + band, h)), f) for y in range(0, h, band)]), 1 / f


def block_mean(a, f):
    """[h, w, 3] uint8 with h, w multiples of f -> [h/f, w/f, 3] uint8 means of f x f blocks."""
    h, w = a.shape[0] // f, a.shape[1] // f
    return a.reshape(h, f, w, f, 3).mean((1, 3)).round().astype(np.uint8)


class SlideImage:
    """A whole-slide image through OpenSlide (.svs, .ndpi, .mrxs, .scn, pyramidal TIFF ...): level-0
    regions decoded on demand, overviews from the pyramid, pixel size from the slide's metadata."""
    def __init__(self, slide):
        self.slide = slide
        self.size = slide.dimensions
        props = slide.properties
        mpp = props.get("openslide.mpp-x")
        if mpp is None and props.get("tiff.ResolutionUnit") in ("centimeter", "inch") and props.get("tiff.XResolution"):
            per_unit = 10000.0 if props["tiff.ResolutionUnit"] == "centimeter" else 25400.0
            mpp = per_unit / float(props["tiff.XResolution"])
        self.pixel_size_um = float(mpp) if mpp else None

    def read(self, x0, y0, x1, y1):
        rgba = np.asarray(self.slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0)))
        if (rgba[..., 3] == 255).all():                  # opaque (all scanned): the blend below is the identity
            return rgba[..., :3]
        alpha = rgba[..., 3:].astype(np.uint16)          # unscanned areas come back transparent: paint them glass-white
        return ((rgba[..., :3] * alpha + WHITE * (255 - alpha)) // 255).astype(np.uint8)

    def overview(self, max_side):
        thumb = self.slide.get_thumbnail((max_side, max_side)).convert("RGB")
        return np.asarray(thumb), thumb.size[0] / self.size[0]


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


def write_slide_tiff(path, rgb, pixel_size_um, tile=256):
    """A pyramidal, JPEG-tiled TIFF with its pixel size in the resolution tags, the layout OpenSlide
    reads as a generic whole-slide image (level 0 then halved levels down to about one tile)."""
    import tifffile
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2 ** 31) as tif:
        level, k = rgb, 1
        while True:
            tif.write(level, tile=(tile, tile), compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                    subfiletype=0 if k == 1 else 1, resolution=(1e4 / pixel_size_um / k,) * 2,
                    resolutionunit="CENTIMETER")
            if max(level.shape[:2]) <= 2 * tile:
                break
            h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            level, k = block_mean(level[:h, :w], 2), k * 2


def open_image(path):
    """Open a slide image: OpenSlide for whole-slide formats, tifffile for other TIFFs, PIL for the
    rest; grayscale, RGBA or palette images are converted to RGB."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: image file not found; check the path or remove the slice's image folder")
    import openslide
    try:
        if openslide.OpenSlide.detect_format(path) is not None:
            return SlideImage(openslide.OpenSlide(path))
    except openslide.OpenSlideError as e:
        raise UserError(f"{path}: OpenSlide cannot read this slide ({e}); is the file complete?") from e
    if path.lower().endswith((".tif", ".tiff")):
        try:
            return TiffImage(path)
        except Exception as e:                           # tifffile raises many types on a damaged or foreign file
            raise UserError(f"{path}: cannot read this TIFF ({type(e).__name__}: {e}); replace the file") from e
    try:
        with Image.open(path) as im:
            return ArrayImage(np.asarray(im.convert("RGB")))
    except OSError as e:
        raise UserError(f"{path}: not an image this program reads ({e}); give an H&E image: .svs, .ndpi, .mrxs, "
                        ".tif, .jpg or .png") from e


def image_size(path):
    """(width, height) from the header only, without decoding pixels."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: image file not found; check the path or remove the slice's image folder")
    import openslide
    if openslide.OpenSlide.detect_format(path) is not None:
        return open_image(path).size
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile
        with tifffile.TiffFile(path) as t:
            return t.pages[0].imagewidth, t.pages[0].imagelength
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise UserError(f"{path}: cannot read image ({e}); replace the file") from e


#################################################################################
#                                 Readers                                       #
#################################################################################

@dataclass
class RawSlice:
    name: str
    patient: str
    barcodes: list
    genes: list
    counts: object                     # float32 [N, G_slice] raw counts, numpy or scipy CSR (Visium HD); None without
    array: np.ndarray                  # int32 [N, 2] (col, row)
    pixel: np.ndarray = None           # float32 [N, 2] (x, y) full-resolution pixels
    image: str = None                  # path of the full-resolution image
    image_array: np.ndarray = None     # in-memory image (demo)
    patches: tuple = None              # (h5 path, row index per spot) of ready HEST patches
    spot_diameter_px: float = None
    pixel_size_um: float = None
    source: str = ""
    overview: tuple = None             # (downscaled image, its px per full-resolution px) once computed
    pixel_size_from: tuple = None      # ("metadata" | "flag" | "estimate", where exactly)
    geometry_um: tuple = None          # (µm per px that the spot or bin geometry implies, how), to check pixel_size_um
    spot_diameter_um: float = None     # a round spot's diameter ...
    bin_size_um: float = None          # ... or a square bin's side (Visium HD, --grid square)


def is_sparse(counts):
    return hasattr(counts, "tocsr")


def non_integer(counts):
    """The values that are not whole numbers: raw counts are, normalised or log values are not."""
    return counts[counts != np.round(counts)]


def check_counts(rs):
    if rs.counts.shape[0] == 0:
        raise UserError(f"{rs.source}: slice {rs.name} has no spots; remove it or fix the file")
    values = rs.counts.data if is_sparse(rs.counts) else rs.counts  # a sparse matrix's zeros need no check
    bad_nan, bad_neg = int(np.isnan(values).sum()), int((values < 0).sum())
    if bad_nan or bad_neg:
        raise UserError(f"{rs.source}: {bad_nan} NaN and {bad_neg} negative counts; raw counts must be "
                        "non-negative numbers (was the matrix already normalised?)")
    frac = non_integer(values)
    # write_slice takes log2(counts + 1): log values would be logged twice
    if frac.size:
        raise UserError(f"{rs.source}: slice {rs.name} holds non-integer values (e.g. {float(frac[0]):g}); "
                        "prepare_data.py needs raw counts, not normalised or log values")


def check_pixel_size(rs, tolerance=0.10):
    """The pixel size in use against the one the spot geometry implies: patches, radii and the AnnData's scale all
    follow it, so a wrong --pixel-size or a mismatched file is refused, not carried silently into every stage."""
    if not (rs.pixel_size_um and rs.geometry_um):
        return
    um, (geo, how) = rs.pixel_size_um, rs.geometry_um
    if abs(um / geo - 1) > tolerance:
        kind, where = rs.pixel_size_from
        raise UserError(f"{rs.source}: slice {rs.name}: pixel size {um:.4g} µm/px ({kind}: {where}) disagrees with "
                        f"the spot geometry's {geo:.4g} µm/px ({how}) by {abs(um / geo - 1):.0%}, over "
                        f"{tolerance:.0%}; check --pixel-size and that the files belong together")


def fit_spacing(grid, pixel):
    """Pixels per array unit from a least-squares fit of pixel ~ a + s·grid, both axes."""
    s = [np.polyfit(grid[:, k], pixel[:, k], 1)[0] for k in (0, 1) if len(grid) > 1 and np.ptp(grid[:, k]) > 0]
    return float(np.mean(np.abs(s))) if s else None


def read_her2st(raw, allow_unmatched):
    """Her2ST GitHub layout: ST-cnts/<s>.tsv.gz (spots x genes), ST-spotfiles/<s>_selection.tsv,
    ST-imgs/<patient>/<s>/*.jpg. Spots are joined on "<x>x<y>"."""
    cnt = {os.path.basename(p)[:-len(".tsv.gz")]: p for p in glob.glob(os.path.join(raw, "ST-cnts", "*.tsv.gz"))}
    spt = {os.path.basename(p)[:-len("_selection.tsv")]: p
           for p in glob.glob(os.path.join(raw, "ST-spotfiles", "*_selection.tsv"))}
    if not cnt and not spt:
        raise UserError(f"{raw}: no ST-cnts/*.tsv.gz or ST-spotfiles/*_selection.tsv; point --raw at the Her2ST "
                        "data folder")
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
            pixel_size_um=200 / s if s else None, source=cnt[name], spot_diameter_um=100.0,
            pixel_size_from=("estimate", "ST's 200 µm spot pitch over the spot file's pixel pitch") if s else None))
    return slices


def open_h5(path, expected):
    """An HDF5 input opened for reading; another file under its name (a CSV, a saved web page) is a user error."""
    if not h5py.is_hdf5(path):
        raise UserError(f"{path}: not an HDF5 file; {expected} expected, replace the file")
    return h5py.File(path, "r")


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
    return cls((node["data"][()], node["indices"][()], node["indptr"][()]),
               shape=tuple(node.attrs["shape"])).toarray().astype(np.float32)


def _h5ad_counts(f, path):
    """X with its genes, or, when X is not integer (normalised or log values), the raw counts AnnData
    keeps beside it in layers/counts (genes of var) or raw/X (genes of raw/var)."""
    X, genes = _h5ad_matrix(f["X"]), _h5ad_index(f["var"])
    if not non_integer(X).size:
        return X, genes
    for key, var in (("layers/counts", "var"), ("raw/X", "raw/var")):
        if key in f:
            print(f"{path}: X is not integer (normalised?); using the raw counts in {key}")
            return _h5ad_matrix(f[key]), _h5ad_index(f[var])
    return X, genes                                      # check_counts refuses it


def read_hest(raw, allow_unmatched):
    """HEST-1k: st/<id>.h5ad (read with h5py) + patches/<id>.h5 (joined by barcode) or wsis/<id>.tif."""
    ids = sorted(os.path.basename(p)[:-len(".h5ad")] for p in glob.glob(os.path.join(raw, "st", "*.h5ad")))
    if not ids:
        raise UserError(f"{raw}: no st/*.h5ad; point --raw at a HEST-1k download folder")
    slices = []
    for sid in tqdm(ids, desc="read hest", unit="slice"):
        path = os.path.join(raw, "st", f"{sid}.h5ad")
        with open_h5(path, "an AnnData .h5ad") as f:
            X, genes = _h5ad_counts(f, path)
            barcodes = _h5ad_index(f["obs"])
            spatial = f["obsm/spatial"][()].astype(np.float32)
            obs = f["obs"]
            array = np.stack([obs["array_col"][()], obs["array_row"][()]], 1).astype(np.int32) \
                if "array_col" in obs and "array_row" in obs else np.round(spatial).astype(np.int32)
            sf = "uns/spatial/ST/scalefactors/spot_diameter_fullres"
            diam = float(f[sf][()]) if sf in f else None
        meta_path = os.path.join(raw, "metadata", f"{sid}.json")
        meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
        um = meta.get("pixel_size_um_estimated")
        rs = RawSlice(name=sid, patient=str(meta.get("patient") or sid), barcodes=barcodes, genes=genes, counts=X,
                      array=array, pixel=spatial, spot_diameter_px=diam, pixel_size_um=um, source=path,
                      pixel_size_from=("estimate", f"{meta_path} pixel_size_um_estimated") if um else None)
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
#                      Slides without spatial data                              #
#################################################################################

SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff", ".btf",
                    ".jpg", ".jpeg", ".png")
# long side of the low-resolution image: tissue detection and the AnnData 'hires' image (Visium's size)
OVERVIEW_SIDE = 2000
# specks and holes smaller than 0.05 mm² are removed / filled (about two Visium spot areas ×10)
MIN_TISSUE_UM2 = 0.05e6
PIXEL_SIZE_RANGE = (0.05, 20.0)  # µm/px a slide's metadata may plausibly give (40x scans ~0.25, 10x ~1)


def slide_paths(items):
    """--image arguments (files or folders of slides) -> sorted unique slide files."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(item, "*")) if p.lower().endswith(SLIDE_EXTENSIONS))
            if not found:
                raise UserError(f"{item}: folder holds no slide image ({', '.join(SLIDE_EXTENSIONS)})")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise UserError(f"--image {item}: no such file or folder")
    return list(dict.fromkeys(paths))


def slide_name(path):
    name = os.path.basename(path)
    for ext in (".ome.tif", ".ome.tiff", *SLIDE_EXTENSIONS):
        if name.lower().endswith(ext):
            return name[:-len(ext)]
    return os.path.splitext(name)[0]


def tissue_mask(rgb, um_per_px):
    """Tissue on a low-resolution RGB image: optical density against the glass colour (the median
    of the brightest tenth, so tinted glass reads as glass) above Macenko's β = 0.15, minus green
    and black pen ink, then specks removed and small holes filled. (Otsu on saturation missed pale
    stroma on pink-tinted glass and haematoxylin-dense regions on Her2ST.)"""
    from scipy.ndimage import binary_dilation, gaussian_filter
    from skimage.morphology import remove_small_holes, remove_small_objects
    a = rgb.astype(np.float32)
    bright = a.sum(-1)
    # a slide all tissue: assume white glass
    glass = np.maximum(np.median(a[bright >= np.percentile(bright, 90)], 0), 200)
    od = gaussian_filter(np.log(glass / np.maximum(a, 1)).clip(0).sum(-1), 1.0)
    # H&E is never green or black
    ink = ((a[..., 1] > a[..., 0] + 15) & (a[..., 1] > a[..., 2] + 15)) | (a.max(-1) <= 40)
    mask = (od > 0.15) & ~binary_dilation(ink, iterations=3)  # dilated past the blur, which spreads ink's density
    area = max(1, int(MIN_TISSUE_UM2 / um_per_px ** 2))
    return remove_small_holes(remove_small_objects(mask, max_size=area), max_size=area)


def spot_grid(W, H, pitch, kind):
    """Spot centres (x, y) in pixels over a W x H image and their grid positions (col, row):
    hexagonal as Visium (rows pitch·√3/2 apart, odd rows shifted by half a pitch, col = 2·i + row
    parity as Visium's array_col) or square."""
    dy = pitch * math.sqrt(3) / 2 if kind == "hex" else pitch
    rows = np.arange(math.ceil(H / dy))                  # every point inside [0, W) x [0, H)
    pts, grid = [], []
    for r in rows:
        shift = pitch / 2 * (r % 2) if kind == "hex" else 0.0
        i = np.arange(math.ceil((W - shift) / pitch))
        pts.append(np.stack([shift + i * pitch, np.full(len(i), r * dy)], 1))
        grid.append(np.stack([2 * i + r % 2 if kind == "hex" else i, np.full(len(i), r)], 1))
    return np.concatenate(pts).astype(np.float32), np.concatenate(grid).astype(np.int32)


def spots_on_tissue(mask, scale, size, um, pitch_um, diameter_um, grid, min_tissue):
    """The grid points of a W x H slide whose spot footprint is at least `min_tissue` tissue on the
    overview mask -> (centres [n, 2] in level-0 px, grid positions [n, 2])."""
    from scipy.ndimage import uniform_filter
    centres, array = spot_grid(*size, pitch_um / um, grid)
    # tissue share per spot
    cover = uniform_filter(mask.astype(np.float32), size=max(1, round(diameter_um / um * scale)))
    cx = np.clip((centres[:, 0] * scale).astype(int), 0, mask.shape[1] - 1)
    cy = np.clip((centres[:, 1] * scale).astype(int), 0, mask.shape[0] - 1)
    keep = cover[cy, cx] >= min_tissue
    return centres[keep], array[keep]


def read_slides(items, pixel_size, pitch_um, diameter_um, grid, min_tissue=0.5):
    """H&E slides without spatial data -> RawSlices without counts: a grid of pseudo-spots over the
    tissue (a spot is kept when at least `min_tissue` of its footprint is tissue). A square grid whose
    spots are as wide as its pitch is a grid of bins, as Visium HD's."""
    is_bin = grid == "square" and diameter_um == pitch_um
    slices = []
    for path in tqdm(slide_paths(items), desc="read slides", unit="slide"):
        img = open_image(path)
        um = pixel_size or img.pixel_size_um
        if um is None:
            raise UserError(f"{path}: the slide states no pixel size; pass --pixel-size (µm per pixel, e.g. 0.5 for "
                            "a 20x scan)")
        if not pixel_size and not PIXEL_SIZE_RANGE[0] <= um <= PIXEL_SIZE_RANGE[1]:
            raise UserError(f"{path}: its metadata gives {um:g} µm per pixel, implausible for H&E; pass --pixel-size")
        thumb, scale = img.overview(OVERVIEW_SIDE)
        mask = tissue_mask(thumb, um / scale)
        if not mask.any():
            raise UserError(f"{path}: no tissue found (bare glass, or only specks under 0.05 mm²); "
                            "is it an H&E slide, and is its pixel size right?")
        centres, array = spots_on_tissue(mask, scale, img.size, um, pitch_um, diameter_um, grid, min_tissue)
        if not len(centres):
            raise UserError(f"{path}: tissue found, but too little for one {diameter_um:g} µm spot; "
                            "check --pixel-size")
        slices.append(RawSlice(
            name=slide_name(path), patient=slide_name(path), barcodes=[f"{c}x{r}" for c, r in array], genes=[],
            counts=None, array=array, pixel=centres, image=path, spot_diameter_px=diameter_um / um,
            pixel_size_um=um, source=path, overview=(thumb, scale),
            pixel_size_from=("flag", "--pixel-size") if pixel_size else ("metadata", f"{path} (its resolution)"),
            bin_size_um=diameter_um if is_bin else None, spot_diameter_um=None if is_bin else diameter_um))
        print(f"{path}: {len(centres)} spots on tissue ({grid} grid, pitch {pitch_um:g} µm, {um:.3f} µm/px, "
              f"tissue {mask.mean():.0%} of the slide)")
    names = [s.name for s in slices]
    if len(set(names)) < len(names):
        raise UserError(f"two slides share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                        "rename one")
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
    frac = np.stack([np.bincount(lab[int(y) - 27:int(y) + 28, int(x) - 27:int(x) + 28].ravel(), minlength=4)
                     for x, y in pixel])
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
                    spot_diameter_px=55.0, pixel_size_um=1.0, source="demo", spot_diameter_um=55.0,
                    pixel_size_from=("metadata", "the synthetic slide is drawn at 1 µm/px"))

"""Stage 1: raw spatial transcriptomics + H&E, or H&E slides alone -> slice files (README "Stages").

    python prepare_data.py --dataset demo --out data/demo
    python prepare_data.py --dataset her2st --raw her2st/data --vocab gene_info.csv --out data/her2st
    python prepare_data.py --dataset visium-hd --raw sample/ --image sample/he.tif --bin-um 8 --out data/hd
    python prepare_data.py --dataset image --image slides/ --out data/slides          # H&E without spatial data
    python prepare_data.py --dataset image --image slides/ --grid square --spot-pitch-um 8 --out data/bins

Writes <out>/slices/<slice>.h5 (patches, spot positions, counts, log2(counts+1) of the selected
genes), <out>/genes.txt and, last, <out>/slices.tsv. Gene selection is Stem's HMHVG. Slides
without spatial data get a grid of pseudo-spots over their tissue, no counts or genes, and no patches
unless --keep-patches: extract_features.py crops those from the slide itself. So do Visium HD bins,
whose counts also stay sparse until the gene panel is chosen.
"""
import argparse
import hashlib
import json
import math
import os
import sys

import h5py
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from common import UserError, atomic_h5, read_gene_list, read_vocab, run, slice_path, str_array, write_text
from readers import (OVERVIEW_SIDE, ArrayImage, check_counts, check_pixel_size, crop_patches, demo_slice, image_size,
                     is_sparse, open_image, read_her2st, read_hest, read_slides, write_slide_tiff)
from visium import HD_BINS, read_visium, read_visium_hd

DROP_PREFIXES = ("MT-", "RPS", "RPL")  # mitochondrial and ribosomal genes (Stem)
PATCH_CHUNK = 256                       # spots cropped and written at a time
COUNT_ROWS = 65536                      # rows of sparse counts made dense at a time


#################################################################################
#                               Gene selection                                  #
#################################################################################

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
    mean, std = gene_moments(sel, genes)
    top_mean = set(np.argsort(-mean, kind="stable")[:n_top])
    top_std = set(np.argsort(-std, kind="stable")[:n_top])
    chosen = [genes[i] for i in sorted(top_mean & top_std)]
    print(f" -> {len(chosen)} in top-{n_top} mean ∩ top-{n_top} std over {len(sel)} slices")
    if not chosen:
        raise UserError("no gene survives selection; raise --n-top or check --vocab / --aliases")
    return chosen


def gene_moments(slices, genes):
    """Mean and std of each gene's raw counts over every spot of `slices`. When a slice is sparse (Visium HD),
    sums and sums of squares are taken slice by slice in float64, so no dense spots x genes matrix is made."""
    if not any(is_sparse(s.counts) for s in slices):
        X = np.concatenate([s.counts[:, _indexer(s.genes, genes)] for s in slices])
        return X.mean(0), X.std(0)
    n, total, squares = 0, np.zeros(len(genes)), np.zeros(len(genes))
    for s in slices:
        cols = _indexer(s.genes, genes)
        s1, s2 = column_sums(s.counts)
        n, total, squares = n + s.counts.shape[0], total + s1[cols], squares + s2[cols]
    mean = total / n
    return mean, np.sqrt(np.maximum(squares / n - mean ** 2, 0))


def column_sums(X, chunk=1 << 24):
    """Per-column sum and sum of squares of a dense or CSR matrix in float64, `chunk` stored values at a time."""
    if not is_sparse(X):
        return X.sum(0, dtype=np.float64), np.square(X, dtype=np.float64).sum(0)
    X, G = X.tocsr(), X.shape[1]
    s1, s2 = np.zeros(G), np.zeros(G)
    for a in range(0, X.nnz, chunk):
        col, v = X.indices[a:a + chunk], X.data[a:a + chunk].astype(np.float64)
        s1 += np.bincount(col, v, G)
        s2 += np.bincount(col, v * v, G)
    return s1, s2


def unmatched_genes(slices, vocab, path):
    """The measured genes the vocabulary lacks: counted here, all listed in the file main() writes."""
    measured = set().union(*(s.genes for s in slices))
    missing = sorted(measured - vocab.keys())
    if missing:
        print(f"vocabulary: {len(missing)} of {len(measured)} measured genes are not in it and are left out "
              f"({', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}; all in {path})")
    return missing


def given_genes(path, slices, vocab):
    """--genes: a fixed list in its own order (a trained model's genes), instead of selecting."""
    genes = read_gene_list(path)
    for s in slices:
        missing = [g for g in genes if g not in s.genes]
        if missing:
            raise UserError(f"{path}: {len(missing)} genes are not measured in slice {s.name}: "
                            f"{', '.join(missing[:5])}")
    if vocab is not None and any(g not in vocab for g in genes):
        raise UserError(f"{path}: genes not in the vocabulary: {', '.join([g for g in genes if g not in vocab][:5])}")
    print(f"genes: the {len(genes)} of {path}")
    return genes


def _indexer(have, want):
    pos = {g: i for i, g in enumerate(have)}
    return [pos[g] for g in want]


#################################################################################
#                                  Writing                                      #
#################################################################################

def has_image(rs):
    return rs.image is not None or rs.image_array is not None or rs.patches is not None


def warn_imageless(slices, shown=10):
    """One line naming the slices written without patches: a misplaced image otherwise goes unnoticed."""
    names = [rs.name for rs in slices if not has_image(rs)]
    if names:
        listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
        print(f"warning: {len(names)} of {len(slices)} slices have no H&E image ({listed}): "
              "they serve gene selection and pre-training only", file=sys.stderr)


def check_image(rs):
    """Before anything is written: the image exists and every spot centre lies on it."""
    if rs.image is None or rs.pixel is None:
        return
    W, H = image_size(rs.image)
    out = (rs.pixel[:, 0] < 0) | (rs.pixel[:, 1] < 0) | (rs.pixel[:, 0] >= W) | (rs.pixel[:, 1] >= H)
    if out.any():
        raise UserError(f"{rs.image}: {int(out.sum())} of {len(out)} spot centres of slice {rs.name} lie outside the "
                        f"{W}x{H} image; is it the full-resolution image of this slice?")


def open_source(rs):
    """The slice's image to crop from, or None (no image, or ready-made HEST patches)."""
    if rs.image_array is not None:
        return ArrayImage(rs.image_array)
    return open_image(rs.image) if rs.image else None


def write_patches(f, rs, source, side, patch_size):
    """Crop, resize and store the patches PATCH_CHUNK spots at a time: memory holds one chunk,
    whatever the number of spots."""
    N = len(rs.barcodes)
    img = f.create_dataset("img", (N, patch_size, patch_size, 3), np.uint8, chunks=(1, patch_size, patch_size, 3))
    for s in tqdm(range(0, N, PATCH_CHUNK), desc=f"patches {rs.name}", unit="chunk", leave=False,
                  disable=N <= PATCH_CHUNK):
        img[s:s + PATCH_CHUNK] = crop_patches(source, rs.pixel[s:s + PATCH_CHUNK], side, patch_size)


def write_thumbnail(f, rs, source):
    thumb, scale = rs.overview or source.overview(OVERVIEW_SIDE)
    f.create_dataset("thumbnail", data=thumb, compression="gzip", compression_opts=4)
    f["thumbnail"].attrs["scale"] = scale                 # thumbnail px per full-resolution px


def write_slide_reference(f, rs, patch_size):
    """What extract_features.py needs to crop a slide's patches itself, as write_patches would have:
    storing them costs 150 kB per spot (7 GB for a 50k-spot slide)."""
    f.attrs.update(slide=os.path.abspath(rs.image), slide_size=image_size(rs.image), patch_size=patch_size)


def hest_patches(rs, patch_size):
    """HEST's ready patches of this slice's spots, in spot order, resized to patch_size -> (side, [N, P, P, 3])."""
    with h5py.File(rs.patches[0], "r") as f:
        order = np.argsort(rs.patches[1])
        raw = f["img"][np.sort(rs.patches[1])][np.argsort(order)]
    img = raw if raw.shape[1] == patch_size else np.stack(
        [np.asarray(Image.fromarray(p).resize((patch_size, patch_size), Image.LANCZOS)) for p in raw])
    return raw.shape[1], img


def write_slice(path, rs, genes, vocab, patch_size, settings, keep_patches=True):
    side = max(224, int(math.ceil(rs.spot_diameter_px or 0)))  # Stem: max(224 px, spot diameter) native pixels
    with atomic_h5(path) as f:
        if rs.image and not keep_patches:                # patches are cropped from the slide when embedded
            write_slide_reference(f, rs, patch_size)
            write_thumbnail(f, rs, None if rs.overview else open_source(rs))  # read_slides computed an overview
        elif (source := open_source(rs)) is not None:
            write_patches(f, rs, source, side, patch_size)
            write_thumbnail(f, rs, source)
        elif rs.patches is not None:
            side, img = hest_patches(rs, patch_size)
            f.create_dataset("img", data=img, chunks=(1, patch_size, patch_size, 3))
        f["barcode"] = str_array(rs.barcodes)
        if rs.pixel is not None:
            f["pixel"] = rs.pixel.astype(np.float32)
        f["array"] = rs.array.astype(np.int32)
        if rs.counts is not None and is_sparse(rs.counts):  # a slide without spatial data has no counts, no genes yet
            write_sparse_counts(f, rs.counts, _indexer(rs.genes, genes))
        elif rs.counts is not None:
            counts = rs.counts[:, _indexer(rs.genes, genes)]
            f["counts"] = counts
            f["expr"] = np.log2(counts + 1).astype(np.float32)  # Stem/HINGE target: log2(count + 1), no library size
        if rs.counts is not None:
            f["genes"] = str_array(genes)
            f["gene_ids"] = np.array([vocab[g] for g in genes] if vocab else np.zeros(len(genes)), np.int64)
        f.attrs.update(dataset=settings["dataset"], slice=rs.name, patient=rs.patient, source=rs.source,
                       patch_px_native=side, settings=settings["hash"])
        if rs.pixel_size_um:
            f.attrs["pixel_size_um"] = float(rs.pixel_size_um)
        if rs.spot_diameter_px:
            f.attrs["spot_diameter_px"] = float(rs.spot_diameter_px)
        if rs.pixel_size_from:                           # "metadata", "flag" or "estimate", and where exactly
            f.attrs["pixel_size_source"], f.attrs["pixel_size_origin"] = rs.pixel_size_from
        for key in ("bin_size_um", "spot_diameter_um"):
            if getattr(rs, key):
                f.attrs[key] = float(getattr(rs, key))


def write_sparse_counts(f, X, cols):
    """The panel's counts of a sparse slice and their log2(count + 1), made dense COUNT_ROWS rows at a time."""
    N, G = X.shape[0], len(cols)
    counts = f.create_dataset("counts", (N, G), np.float32)
    expr = f.create_dataset("expr", (N, G), np.float32)
    for s in range(0, N, COUNT_ROWS):
        block = X[s:s + COUNT_ROWS][:, cols].toarray().astype(np.float32)
        counts[s:s + COUNT_ROWS], expr[s:s + COUNT_ROWS] = block, np.log2(block + 1)


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


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["demo", "her2st", "visium", "visium-hd", "hest", "image"], default="demo",
                   help="raw layout: demo (synthetic, no input), her2st (GitHub layout), visium (Space Ranger outs/), "
                        "visium-hd (Space Ranger outs/binned_outputs/ of Visium HD), hest (HEST-1k), image (H&E slides "
                        "without spatial data, given by --image)")
    p.add_argument("--raw", help="raw data folder (her2st, visium, visium-hd, hest)")
    p.add_argument("--bin-um", type=int, choices=HD_BINS,
                   help="visium-hd: the bins to read, binned_outputs/square_008um or square_016um (default 16)")
    p.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    p.add_argument("--image", nargs="+",
                   help="image: slide files or folders of slides (.svs, .ndpi, .mrxs, .tif, .jpg, .png ...); visium, "
                        "visium-hd: the full-resolution H&E image when --raw holds one outs/ folder (else the image "
                        "beside outs/)")
    p.add_argument("--pixel-size", type=float,
                   help="µm per pixel of the full-resolution image. image: overrides the slide's metadata (needed "
                        "for .jpg/.png, whose dpi tags are unreliable); visium, visium-hd: overrides Space Ranger's, "
                        "and is refused when it disagrees with the spots' or bins' geometry by over 10 %%")
    p.add_argument("--spot-pitch-um", type=float,
                   help="image: distance between neighbouring pseudo-spot centres in µm (default 100, Visium)")
    p.add_argument("--spot-diameter-um", type=float,
                   help="image: pseudo-spot diameter in µm (default 55, Visium, on a hex grid; the pitch on a square "
                        "grid: bins); the patch side is max(224 px, diameter), as for training slices")
    p.add_argument("--grid", choices=["hex", "square"],
                   help="image: hexagonal as Visium (default) or square: bins as wide as the pitch, e.g. "
                        "--spot-pitch-um 8 or 16 for Visium HD's bins")
    p.add_argument("--keep-patches", action="store_true",
                   help="image, visium-hd: also store every patch in the slice file (`img`, about 150 kB per spot); by "
                        "default extract_features.py crops them from the slide, which must then stay where it is")
    p.add_argument("--vocab", help="the backbone's vocabulary, CellFM gene_info.csv or scGPT vocab.json: keep only "
                                   "vocabulary genes and store their token ids")
    p.add_argument("--aliases", help="optional table old symbol -> current symbol, applied before the vocabulary")
    p.add_argument("--genes", help="use this gene list (one symbol per line, in order) instead of selecting genes, "
                                   "e.g. the list an official HINGE checkpoint was trained on")
    p.add_argument("--n-top", type=int, default=300, help="N of HMHVG: top-N by mean ∩ top-N by std (default 300)")
    p.add_argument("--select-from",
                   help="comma-separated slices used for gene selection (default: all); keeps test slices out")
    p.add_argument("--test-slices", help="held-out slices, comma-separated, or first-per-patient (the first slice with "
                                         "an image of each patient): checked to exist and kept out of gene selection "
                                         "(the paper selects genes across training slices); written to test_slices.txt")
    p.add_argument("--patch-size", type=int, default=224, help="stored patch side in pixels (default 224)")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="drop spots that have counts but no position instead of failing")
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite complete slice files and replace another dataset in --out")
    a = p.parse_args()
    for flag in ("pixel_size", "spot_pitch_um", "spot_diameter_um"):
        if getattr(a, flag) is not None and getattr(a, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(a, flag)}: must be a positive number")
    if a.pixel_size and a.dataset not in ("image", "visium", "visium-hd"):
        raise UserError(f"--pixel-size: --dataset {a.dataset} takes the pixel size from its own files; the flag is "
                        "for image, visium and visium-hd")
    for flag, dataset in (("bin_um", "visium-hd"), ("grid", "image"), ("spot_pitch_um", "image"),
                          ("spot_diameter_um", "image")):  # a flag another layout would ignore is refused, not dropped
        if getattr(a, flag) is not None and a.dataset != dataset:
            raise UserError(f"--{flag.replace('_', '-')} is for --dataset {dataset}, not {a.dataset}")
    a.bin_um = a.bin_um or 16
    a.grid, a.spot_pitch_um = a.grid or "hex", a.spot_pitch_um or 100.0
    if a.spot_diameter_um is None:                       # a square grid's spots are bins: as wide as the pitch
        a.spot_diameter_um = a.spot_pitch_um if a.grid == "square" else 55.0
    if a.dataset == "image":
        if not a.image:
            raise UserError("--dataset image needs --image SLIDE [SLIDE ...] (files or folders)")
    elif a.dataset != "demo" and not (a.raw and os.path.isdir(a.raw)):
        hint = f"--raw {a.raw}: not a folder" if a.raw else "--raw is missing"
        raise UserError(f"{hint}; --dataset {a.dataset} needs the raw data folder")
    if a.test_slices and a.select_from:
        raise UserError("--test-slices and --select-from both choose the selection slices; give one")
    if a.dataset in ("visium", "visium-hd") and a.image and len(a.image) > 1:
        raise UserError(f"--image names {len(a.image)} files; {a.dataset} takes one image (or put each beside its "
                        "outs/)")
    return a


def read_dataset(a):
    if a.dataset == "demo":
        return [demo_slice(k) for k in range(4)]
    if a.dataset == "her2st":
        return read_her2st(a.raw, a.allow_unmatched)
    if a.dataset == "visium":
        return read_visium(a.raw, a.allow_unmatched, a.image[0] if a.image else None, a.pixel_size)
    if a.dataset == "visium-hd":
        return read_visium_hd(a.raw, a.bin_um, a.allow_unmatched, a.image[0] if a.image else None, a.pixel_size)
    if a.dataset == "hest":
        return read_hest(a.raw, a.allow_unmatched)
    return read_slides(a.image, a.pixel_size, a.spot_pitch_um, a.spot_diameter_um, a.grid)


def resolve_test_slices(spec, slices):
    """--test-slices -> the held-out slice names (None without the flag), checked before anything is written."""
    if not spec:
        return None
    names = [rs.name for rs in slices]
    if spec == "first-per-patient":
        first = {}
        for rs in slices:
            if has_image(rs):
                first.setdefault(rs.patient, rs.name)
        return list(first.values())
    test = spec.split(",")
    if unknown := [t for t in test if t not in names]:
        raise UserError(f"--test-slices {','.join(unknown)}: not a slice of this dataset "
                        f"(slices: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''})")
    return test


def main():
    a = parse_args()
    vocab = read_vocab(a.vocab) if a.vocab else None
    aliases = read_aliases(a.aliases) if a.aliases else {}
    select_from = set(a.select_from.split(",")) if a.select_from else None
    settings = {"dataset": a.dataset, "raw": os.path.abspath(a.raw) if a.raw else None, "n_top": a.n_top,
                "vocab": os.path.basename(a.vocab) if a.vocab else None, "aliases": bool(a.aliases),
                "select_from": sorted(select_from) if select_from else None, "patch_size": a.patch_size,
                "allow_unmatched": a.allow_unmatched}
    if a.test_slices:
        settings["test_slices"] = a.test_slices
    if a.genes:
        settings["genes"] = os.path.abspath(a.genes)
    if a.dataset == "image":
        settings.update(image=[os.path.abspath(i) for i in a.image], pixel_size=a.pixel_size, grid=a.grid,
                        spot_pitch_um=a.spot_pitch_um, spot_diameter_um=a.spot_diameter_um, keep_patches=a.keep_patches)
    if a.dataset == "visium-hd":
        settings.update(image=os.path.abspath(a.image[0]) if a.image else None, bin_um=a.bin_um,
                        pixel_size=a.pixel_size, keep_patches=a.keep_patches)
    elif a.dataset == "visium" and a.pixel_size:         # only when given: folders prepared before the flag still match
        settings["pixel_size"] = a.pixel_size
    settings["hash"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    check_out_dir(a.out, settings, a.overwrite)

    slices = read_dataset(a)
    test = resolve_test_slices(a.test_slices, slices)
    if test is not None:
        select_from = {rs.name for rs in slices} - set(test)
        if not select_from:
            raise UserError(f"--test-slices {a.test_slices}: every slice is held out, "
                            "none is left to select genes from")
    if select_from and not select_from <= {s.name for s in slices}:
        raise UserError("--select-from names unknown slices: "
                        f"{', '.join(sorted(select_from - {s.name for s in slices}))}")
    genes, unmatched = None, []
    unmatched_path = os.path.join(a.out, "genes_not_in_vocab.txt")
    if a.dataset != "image":
        for rs in slices:
            check_counts(rs)
            apply_aliases(rs, aliases)
            check_image(rs)
            check_pixel_size(rs)
        warn_imageless(slices)
        unmatched = unmatched_genes(slices, vocab, unmatched_path) if vocab is not None else []
        genes = given_genes(a.genes, slices, vocab) if a.genes else select_genes(slices, vocab, a.n_top, select_from)

    write_text(os.path.join(a.out, "prepare.json"), json.dumps(settings, indent=1) + "\n")
    if genes is not None:
        write_text(os.path.join(a.out, "genes.txt"), "".join(g + "\n" for g in genes))
    if unmatched:
        write_text(unmatched_path, "".join(g + "\n" for g in unmatched))
    if test is not None:
        write_text(os.path.join(a.out, "test_slices.txt"), "".join(t + "\n" for t in test))
    for rs in tqdm(slices, desc="write slices", unit="slice"):
        if a.dataset == "demo" and (a.overwrite or not os.path.isfile(demo_image(a.out, rs.name))):
            write_slide_tiff(demo_image(a.out, rs.name), rs.image_array, rs.pixel_size_um)  # to try --dataset image on
        path = slice_path(a.out, rs.name)
        if not a.overwrite and os.path.isfile(path):
            with h5py.File(path, "r") as f:
                if f.attrs.get("settings") == settings["hash"]:
                    continue
        keep = a.keep_patches or a.dataset not in ("image", "visium-hd")  # 62k bins' patches would be 9 GB
        write_slice(path, rs, genes, vocab, a.patch_size, settings, keep_patches=keep)
    has_img = {rs.name: has_image(rs) for rs in slices}
    rows = [f"{rs.name}\t{rs.patient}\t{len(rs.barcodes)}\t{int(has_img[rs.name])}\n" for rs in slices]
    write_text(os.path.join(a.out, "slices.tsv"), "slice\tpatient\tn_spots\thas_image\n" + "".join(rows))
    what = (f"{len(genes)} genes" if genes is not None
            else "no expression (sample.py takes the genes from the checkpoint)")
    print(f"wrote {len(slices)} slices ({sum(has_img.values())} with images, {sum(len(rs.barcodes) for rs in slices)} "
          f"spots), {what} -> {a.out}")


def demo_image(out, name):
    return os.path.join(out, "images", f"{name}.tif")


if __name__ == "__main__":
    run(main)

"""Prediction files (sample.py and baselines.py write them, evaluate.py scores them) and their AnnData twins."""
import json
import os

import anndata
import h5py
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from common import atomic_path, decode, existing_slice, str_array


class PredictionFile:
    """The one writer of prediction files (sample.py, baselines.py) in an open HDF5 file: `pred` and `std`
    [N, G], optionally `samples` float16 [S, N, G] and `steps` [R, N, G], a block of spots at a time (one
    chunk per block), then the spot ids, genes and attributes."""
    def __init__(self, f, N, G, rows, n_samples=0, n_steps=0):
        self.f, rows = f, min(rows, N)
        f.create_dataset("pred", (N, G), np.float32, chunks=(rows, G))
        f.create_dataset("std", (N, G), np.float32, chunks=(rows, G))
        if n_samples:
            f.create_dataset("samples", (n_samples, N, G), np.float16, chunks=(1, rows, G))
        if n_steps:
            f.create_dataset("steps", (n_steps, N, G), np.float32, chunks=(1, rows, G))

    def write(self, start, mean, std, samples=None, steps=None):
        stop = start + len(mean)
        self.f["pred"][start:stop], self.f["std"][start:stop] = mean, std
        if "samples" in self.f:
            self.f["samples"][:, start:stop] = np.asarray(samples).astype(np.float16)
        if "steps" in self.f:
            self.f["steps"][:, start:stop] = steps

    def finish(self, barcodes, genes, **attrs):
        self.f["barcode"], self.f["genes"] = barcodes, str_array(genes)
        self.f.attrs.update(**attrs)


def spot_diameter(s, pixel):
    """Spot diameter in full-resolution px: the slice's own, else half the nearest-neighbour spacing."""
    if "spot_diameter_px" in s.attrs:
        return float(s.attrs["spot_diameter_px"])
    return float(np.median(cKDTree(pixel).query(pixel, k=2)[0][:, 1]) / 2) if len(pixel) > 1 else 1.0


def slice_layout(s):
    """An open slice file's geometry -> (spot centres [N, 2] in full-resolution px, spot diameter
    in px, thumbnail or None, thumbnail px per full-resolution px)."""
    pixel = s["pixel"][()] if "pixel" in s else s["array"][()].astype(np.float32)
    thumb = s["thumbnail"][()] if "thumbnail" in s else None
    scale = float(s["thumbnail"].attrs["scale"]) if thumb is not None else 1.0
    return pixel, spot_diameter(s, pixel), thumb, scale


def write_anndata(pred_path, data_dir):
    """<pred>.h5ad beside a prediction file, laid out as scanpy's Visium reader lays out a slide, so
    that `scanpy.pl.spatial(adata, color=GENE)` draws the prediction over the H&E with no argument:
    X = predicted log2(count + 1), layers 'std' (spread over the samples) and 'truth' (when the
    slice has expression), obsm 'spatial' = full-resolution pixel (x, y), uns['spatial'][slice] =
    the thumbnail as the 'hires' image with its scalefactors. anndata writes the file; the [N, G]
    matrices are then copied in block by block, so memory does not grow with the number of spots."""
    name = os.path.basename(pred_path)[:-len(".h5")]
    with h5py.File(pred_path, "r") as f, h5py.File(existing_slice(data_dir, name), "r") as s:
        genes, barcodes = decode(f["genes"]), decode(f["barcode"])
        array = s["array"][()]
        pixel, diameter, thumb, scale = slice_layout(s)
        spatial = {"scalefactors": {"spot_diameter_fullres": diameter},
                   "metadata": {"source": str(s.attrs.get("source", ""))}}
        if thumb is not None:
            spatial["images"] = {"hires": thumb}
            spatial["scalefactors"]["tissue_hires_scalef"] = scale
        if "pixel_size_um" in s.attrs:
            spatial["metadata"]["pixel_size_um"] = float(s.attrs["pixel_size_um"])
        if "bin_size_um" in s.attrs:                     # as Space Ranger's Visium HD scalefactors_json.json
            spatial["scalefactors"]["bin_size_um"] = float(s.attrs["bin_size_um"])
        obs = pd.DataFrame({"in_tissue": 1, "array_row": array[:, 1], "array_col": array[:, 0]}, index=barcodes)
        ad = anndata.AnnData(obs=obs, var=pd.DataFrame(index=genes))
        ad.obsm["spatial"] = pixel.astype(np.float64)
        ad.uns["spatial"] = {name: spatial}
        ad.uns["expression_units"] = "log2(count + 1)"  # the training target of the paper (and Stem)
        ad.uns["prediction"] = {k: v.item() if hasattr(v, "item") else v for k, v in f.attrs.items()}
        matrices = {"X": f["pred"]}
        if "std" in f:
            matrices["layers/std"] = f["std"]
        if "expr" in s and decode(s["genes"]) == genes:
            matrices["layers/truth"] = s["expr"]
        with atomic_path(pred_path + "ad") as tmp:
            ad.write_h5ad(tmp)
            with h5py.File(tmp, "r+") as out:
                for key, src in matrices.items():
                    copy_rows(src, out, key)
    return pred_path + "ad"


def copy_rows(src, out, key, rows=4096):
    """A dense [N, G] matrix into an h5ad file under `key`, as anndata encodes a dense array."""
    dst = out.create_dataset(key, src.shape, np.float32, chunks=(min(rows, src.shape[0]), src.shape[1]))
    for s in range(0, src.shape[0], rows):
        dst[s:s + rows] = src[s:s + rows]
    dst.attrs["encoding-type"], dst.attrs["encoding-version"] = "array", "0.2.0"


#################################################################################
#                 What a prediction means: units and provenance                 #
#################################################################################

def spot_size(attrs):
    """("bin" or "spot", µm) of a slice's spots: a square bin's side or a round spot's diameter; None if unknown."""
    if "bin_size_um" in attrs:
        return "bin", float(attrs["bin_size_um"])
    if "spot_diameter_um" in attrs:
        return "spot", float(attrs["spot_diameter_um"])
    if "spot_diameter_px" in attrs and "pixel_size_um" in attrs:  # slice files written before spot_diameter_um
        return "spot", float(attrs["spot_diameter_px"]) * float(attrs["pixel_size_um"])
    return None


def gene_panel(train):
    """Where the predicted genes were chosen, in words, from the training data's prepare.json."""
    if train.get("imported_from"):
        return f"the gene list {train.get('genes_file')} of the official checkpoint {train['imported_from']}"
    manifest = os.path.join(str(train.get("data")), "prepare.json")
    if not os.path.isfile(manifest):
        return "unknown (the training data's prepare.json is not found)"
    st = json.load(open(manifest))
    if st.get("genes"):
        return f"the list {st['genes']} (prepare_data.py --genes) on {st.get('dataset')} data {train['data']}"
    over = (f"slices {', '.join(st['select_from'])}" if st.get("select_from") else
            f"all slices but the held-out {st['test_slices']}" if st.get("test_slices") else "all slices")
    vocab = f", within the vocabulary {st['vocab']}" if st.get("vocab") else ""
    return (f"HMHVG (Stem): top-{st.get('n_top')} by mean ∩ top-{st.get('n_top')} by std of raw counts over {over} of "
            f"{st.get('dataset')} data {train['data']}{vocab}")


def provenance(data_dir, name, train):
    """What a prediction's numbers are, for its attributes (and so uns['prediction']): their units (log2(count + 1)
    of the training data's counts, per training spot), where the genes came from, the spot or bin predicted, and
    the pixel size with its source (metadata, the user's flag or an estimate). `train`: the training data folder
    ("data"), its slices ("slices"), an official checkpoint's origin ("imported_from", "genes_file"), as the
    writer knows them. Unknown items are said to be unknown."""
    with h5py.File(existing_slice(data_dir, name), "r") as s:
        slice_attrs = dict(s.attrs)
    trained = None
    for n in train.get("slices", []):                    # the first training slice that still exists
        path = os.path.join(str(train.get("data")), "slices", f"{n}.h5")
        if os.path.isfile(path):
            with h5py.File(path, "r") as t:
                trained = (spot_size(t.attrs), str(t.attrs.get("dataset", "")))
            break
    out = {"training_data": str(train.get("data") or "unknown"), "gene_panel": gene_panel(train)}
    if train.get("imported_from"):
        out["units"] = f"log2(count + 1) of the counts the official checkpoint {train['imported_from']} learned"
    elif trained and trained[0]:
        (kind, um), dataset = trained
        out["units"] = (f"log2(count + 1) of the training data's raw counts per {um:g} µm {kind} ({dataset}), "
                        "no library-size normalisation")
    else:
        out["units"] = "log2(count + 1) of the training data's raw counts, no library-size normalisation"
    here = spot_size(slice_attrs)
    if here:
        out["spot_kind"] = here[0]
        out["bin_size_um" if here[0] == "bin" else "spot_diameter_um"] = here[1]
        if trained and trained[0] and abs(trained[0][1] / here[1] - 1) > 0.01:
            out["units_note"] = (f"each {here[1]:g} µm {here[0]} is predicted on the scale of a {trained[0][1]:g} µm "
                                 f"training {trained[0][0]}: compare maps and ranks, not counts per {here[0]}")
    if "pixel_size_um" in slice_attrs:
        out["pixel_size_um"] = float(slice_attrs["pixel_size_um"])
        out["pixel_size_source"] = str(slice_attrs.get("pixel_size_source", "unknown"))
        if "pixel_size_origin" in slice_attrs:
            out["pixel_size_origin"] = str(slice_attrs["pixel_size_origin"])
    return out

"""Slides without spatial data: whole-slide images through OpenSlide, tissue detection, the
pseudo-spot grid, generation without expression, the AnnData output and its bad inputs."""
import glob
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

import extract_features as X
import readers as R
from common import decode
from conftest import HER2ST, ROOT, assert_user_error, needs_shared, run_script

Image.MAX_IMAGE_PIXELS = None
GLASS = (226, 212, 228)                                  # pink-tinted glass, as Her2ST's B4


def prepare_image(out, *images, extra=(), check=True):
    return run_script("prepare_data.py", "--dataset", "image", "--image", *images, "--out", out, *extra, check=check)


def glass_image(shape, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.array(GLASS) + rng.normal(0, 3, (*shape, 3)), 0, 255).astype(np.uint8)


def paint_tissue(img, y0, y1, x0, x1, seed=1):
    """Eosin-pink tissue with haematoxylin-purple nuclei in a rectangle."""
    rng = np.random.default_rng(seed)
    block = np.clip(np.array([215, 120, 175]) + rng.normal(0, 12, (y1 - y0, x1 - x0, 3)), 0, 255)
    nuclei = rng.random((y1 - y0, x1 - x0)) < 0.15
    block[nuclei] = (90, 50, 140)
    img[y0:y1, x0:x1] = block.astype(np.uint8)
    return img


def assert_nothing_written(out):
    assert not glob.glob(os.path.join(out, "**", "*.*"), recursive=True)


# ----------------------------------------------------------------------------- real tissue through OpenSlide

@pytest.fixture(scope="module")
def c2_slide(tmp_path_factory):
    """A pyramidal JPEG-tiled TIFF of real tissue: a corner of Her2ST C2 with tissue and glass."""
    if not os.path.isdir(HER2ST):
        pytest.skip(f"shared data not found at {HER2ST}")
    img = np.asarray(Image.open(glob.glob(os.path.join(HER2ST, "ST-imgs", "C", "C2", "*.jpg"))[0]).convert("RGB"))
    path = str(tmp_path_factory.mktemp("c2") / "c2_corner.tif")
    R.write_slide_tiff(path, np.ascontiguousarray(img[5500:8500, 1500:5500]), 0.69)
    return path


@needs_shared
def test_real_tissue_tiff_is_read_through_openslide(c2_slide):
    img = R.open_image(c2_slide)
    assert isinstance(img, R.SlideImage) and img.slide.level_count >= 3
    assert img.size == (4000, 3000) and img.pixel_size_um == pytest.approx(0.69)
    ref = tifffile.imread(c2_slide, level=0)                # tifffile's own decoding of the same JPEG tiles
    got = img.read(1000, 700, 1224, 924).astype(int)
    assert np.abs(got - ref[700:924, 1000:1224]).mean() < 2


@needs_shared
def test_real_tissue_spots_cover_the_tissue_and_not_the_glass(c2_slide, tmp_path):
    prepare_image(tmp_path / "out", c2_slide, extra=("--spot-diameter-um", "100"))
    with h5py.File(tmp_path / "out" / "slices" / "c2_corner.h5", "r") as f:
        pixel, attrs = f["pixel"][()], dict(f.attrs)
        assert attrs["pixel_size_um"] == pytest.approx(0.69) and attrs["patch_px_native"] == 224
        assert attrs["slide"] == os.path.abspath(c2_slide) and attrs["patch_size"] == 224
        assert not {"counts", "expr", "genes", "img"} & set(f)  # patches are cropped from the slide when embedded
        patches = X.SlidePatches(f, "c2_corner")[:]
        slide = R.open_image(c2_slide)
        # a patch is the slide around its spot, as for training slices
        for i in [0, len(pixel) // 2, len(pixel) - 1]:
            x, y = np.round(pixel[i]).astype(int)
            np.testing.assert_array_equal(patches[i], slide.read(x - 112, y - 112, x + 112, y + 112))
        centre = patches[:, 80:144, 80:144].reshape(len(pixel), -1, 3).mean(1)
    thumb, scale = slide.overview(2000)
    px = thumb.reshape(-1, 3).astype(float)
    glass = np.median(px[px.sum(1) >= np.percentile(px.sum(1), 90)], 0)
    assert (np.abs(centre - glass).sum(1) > 40).mean() > 0.95  # the spots sit on stained tissue, not glass
    mask = R.tissue_mask(thumb, 0.69 / scale)
    expected = mask.sum() / scale ** 2 * 0.69 ** 2 / (100 ** 2 * np.sqrt(3) / 2)  # tissue area / area per hex spot
    assert 0.8 * expected < len(pixel) < 1.1 * expected


@needs_shared
def test_features_streamed_from_the_slide_equal_those_of_stored_patches(c2_slide, tmp_path):
    grid = ("--spot-diameter-um", "100", "--spot-pitch-um", "250")
    prepare_image(tmp_path / "stream", c2_slide, extra=grid)
    prepare_image(tmp_path / "keep", c2_slide, extra=(*grid, "--keep-patches"))
    for out in ("stream", "keep"):
        run_script("extract_features.py", "--data", tmp_path / out, "--encoder", "stain", "--batch-size", "16")
    with h5py.File(tmp_path / "keep" / "slices" / "c2_corner.h5", "r") as k, \
            h5py.File(tmp_path / "stream" / "slices" / "c2_corner.h5", "r") as s:
        stored, n = k["img"][()], len(k["barcode"])
        np.testing.assert_array_equal(X.SlidePatches(s, "c2_corner")[:], stored)  # the same crops, pixel for pixel
        assert n > 50 and (stored.std((1, 2, 3)) > 10).mean() > 0.9  # real, varied tissue
    size = {out: os.path.getsize(tmp_path / out / "slices" / "c2_corner.h5") for out in ("stream", "keep")}
    assert size["keep"] - size["stream"] >= n * 224 * 224 * 3  # the stored patches are what the default saves
    emb = {out: h5py.File(tmp_path / out / "features" / "stain" / "c2_corner.h5", "r")["embeddings"][()]
           for out in ("stream", "keep")}
    assert emb["stream"].shape == (n, 74)
    np.testing.assert_array_equal(emb["stream"], emb["keep"])  # bit-exact


def test_moved_or_replaced_slide_is_named_before_anything_is_written(tmp_path):
    R.write_slide_tiff(str(tmp_path / "s.tif"), paint_tissue(glass_image((800, 900)), 100, 700, 100, 800), 1.0)
    prepare_image(tmp_path / "out", tmp_path / "s.tif")
    os.rename(tmp_path / "s.tif", tmp_path / "moved.tif")
    p = run_script("extract_features.py", "--data", tmp_path / "out", "--encoder", "stain", check=False)
    assert_user_error(p, str(tmp_path / "s.tif"), "slice s", "not found", "--image")
    assert not (tmp_path / "out" / "features").exists()
    R.write_slide_tiff(str(tmp_path / "s.tif"), paint_tissue(glass_image((700, 900)), 100, 600, 100, 800), 1.0)
    p = run_script("extract_features.py", "--data", tmp_path / "out", "--encoder", "stain", check=False)
    assert_user_error(p, "s.tif", "900x700", "900x800", "prepare it again")  # another slide at the same path
    assert not (tmp_path / "out" / "features").exists()


# ----------------------------------------------------------------------------- grid and tissue detection

def test_hex_grid_is_visium_like():
    xy, array = R.spot_grid(1000, 800, 100.0, "hex")
    from scipy.spatial import cKDTree
    d, _ = cKDTree(xy).query(xy, k=7)
    np.testing.assert_allclose(d[:, 1], 100.0, rtol=1e-5)  # every spot's nearest neighbours are one pitch away
    assert (d[:, 1:7] < 100.01).sum(1).max() == 6          # six of them inside the grid: hexagonal
    assert ((array[:, 0] - array[:, 1]) % 2 == 0).all()    # Visium's array_col parity follows the row
    probe = np.random.default_rng(0).uniform([100, 100], [900, 700], (2000, 2))
    # no point of the tissue farther than pitch/√3
    assert cKDTree(xy).query(probe)[0].max() <= 100 / np.sqrt(3) + 1e-6
    sq, arr = R.spot_grid(1000, 800, 100.0, "square")
    assert len(sq) == 10 * 8 and np.array_equal(sq, arr * 100.0)  # inside the 1000 x 800 image: x < 1000, y < 800
    assert xy[:, 0].max() < 1000 and xy[:, 1].max() < 800


def test_tissue_mask_keeps_tissue_and_drops_glass_ink_and_specks():
    img = paint_tissue(glass_image((400, 600)), 100, 300, 150, 400)
    img[50:60, 20:580] = (40, 170, 60)                   # a green pen line across the glass
    img = paint_tissue(img, 350, 353, 500, 503, seed=2)  # a speck of debris
    mask = R.tissue_mask(img, 8.0)
    assert mask[110:290, 160:390].mean() > 0.99
    assert mask[:, :140].sum() + mask[:, 410:].sum() + mask[:95].sum() == 0


# ----------------------------------------------------------------------------- bad inputs

def test_all_glass_slide_is_refused(tmp_path):
    R.write_slide_tiff(str(tmp_path / "glass.tif"), glass_image((1200, 1500)), 0.5)
    p = prepare_image(tmp_path / "out", tmp_path / "glass.tif", check=False)
    assert_user_error(p, "glass.tif", "no tissue")
    assert_nothing_written(tmp_path / "out")


def test_non_image_file_is_refused(tmp_path):
    (tmp_path / "slide.svs").write_text("not a slide\n")
    p = prepare_image(tmp_path / "out", tmp_path / "slide.svs", check=False)
    assert_user_error(p, "slide.svs", "not an image")
    assert_nothing_written(tmp_path / "out")


def test_slide_without_pixel_size_needs_the_flag(tmp_path):
    img = paint_tissue(glass_image((600, 700)), 100, 500, 100, 600)
    tifffile.imwrite(tmp_path / "nores.tif", img, tile=(256, 256), compression="jpeg", photometric="rgb")
    Image.fromarray(img).save(tmp_path / "plain.png")
    for name in ("nores.tif", "plain.png"):
        p = prepare_image(tmp_path / "out", tmp_path / name, check=False)
        assert_user_error(p, name, "--pixel-size")
        assert_nothing_written(tmp_path / "out")
    prepare_image(tmp_path / "out", tmp_path / "plain.png", extra=("--pixel-size", "2"))
    with h5py.File(tmp_path / "out" / "slices" / "plain.h5", "r") as f:
        assert f.attrs["pixel_size_um"] == 2.0 and len(f["barcode"]) > 10


@pytest.mark.parametrize("unit, per_unit", [("INCH", 25400.0), ("CENTIMETER", 10000.0)])
def test_pixel_size_from_tiff_resolution_tags(tmp_path, unit, per_unit):
    img = paint_tissue(glass_image((300, 300)), 50, 250, 50, 250)
    tiled, striped = tmp_path / "tiled.tif", tmp_path / "striped.tif"
    tifffile.imwrite(tiled, img, tile=(256, 256), photometric="rgb", resolution=(per_unit / 0.4,) * 2,
                     resolutionunit=unit)
    tifffile.imwrite(striped, img, photometric="rgb", resolution=(per_unit / 0.4,) * 2, resolutionunit=unit)
    assert isinstance(R.open_image(str(tiled)), R.SlideImage) and isinstance(R.open_image(str(striped)), R.TiffImage)
    assert R.open_image(str(tiled)).pixel_size_um == pytest.approx(0.4)
    assert R.open_image(str(striped)).pixel_size_um == pytest.approx(0.4)
    np.testing.assert_array_equal(R.open_image(str(striped)).read(10, 20, 110, 90), img[20:90, 10:110])


def test_folder_of_slides_and_duplicate_names(tmp_path):
    for k in range(2):
        R.write_slide_tiff(str(tmp_path / "in" / f"s{k}.tif"),
                           paint_tissue(glass_image((800, 900)), 100, 700, 100, 800, k), 1.0)
    prepare_image(tmp_path / "out", tmp_path / "in")
    assert sorted(os.listdir(tmp_path / "out" / "slices")) == ["s0.h5", "s1.h5"]
    os.makedirs(tmp_path / "in2")
    os.link(tmp_path / "in" / "s0.tif", tmp_path / "in2" / "s0.tif")
    p = prepare_image(tmp_path / "out2", tmp_path / "in" / "s0.tif", tmp_path / "in2" / "s0.tif", check=False)
    assert_user_error(p, "share a name", "s0")
    assert_nothing_written(tmp_path / "out2")


# ----------------------------------------------------------------------------- generation and AnnData

@pytest.fixture(scope="module")
def predicted_slide(demo, hinge_run, tmp_path_factory):
    """demo1's image as a slide without spatial data, through prepare -> features -> sample."""
    root = tmp_path_factory.mktemp("slide")
    prepare_image(root / "data", demo / "data" / "images" / "demo1.tif")
    run_script("extract_features.py", "--data", root / "data", "--encoder", "stain")
    run_script("sample.py", "--run", hinge_run, "--data", root / "data", "--slices", "demo1", "--samples", "3",
               "--out", root / "pred")
    return root


def test_generation_without_expression(predicted_slide, hinge_run):
    import torch
    genes = torch.load(hinge_run / "best.pt", weights_only=False)["genes"]
    with h5py.File(predicted_slide / "pred" / "demo1.h5", "r") as f, \
            h5py.File(predicted_slide / "data" / "slices" / "demo1.h5", "r") as s:
        assert "expr" not in s and decode(f["genes"]) == genes and decode(f["barcode"]) == decode(s["barcode"])
        pred, std, n = f["pred"][()], f["std"][()], len(s["barcode"])
    assert pred.shape == std.shape == (n, len(genes))
    assert (std >= 0).all() and std.std() > 0            # a spread that differs between spots and genes
    assert pred.std(0).mean() > 0.05                     # the histology moves the prediction from spot to spot


def test_anndata_has_scanpys_visium_layout_and_spots_on_tissue(predicted_slide):
    import anndata
    ad = anndata.read_h5ad(predicted_slide / "pred" / "demo1.h5ad")
    with h5py.File(predicted_slide / "pred" / "demo1.h5", "r") as f, \
            h5py.File(predicted_slide / "data" / "slices" / "demo1.h5", "r") as s:
        np.testing.assert_array_equal(ad.X, f["pred"][()])
        np.testing.assert_array_equal(ad.layers["std"], f["std"][()])
        assert list(ad.var_names) == decode(f["genes"]) and list(ad.obs_names) == decode(f["barcode"])
        np.testing.assert_allclose(ad.obsm["spatial"], s["pixel"][()])
        patches = X.SlidePatches(s, "demo1")[:]
    assert "truth" not in ad.layers and ad.uns["expression_units"] == "log2(count + 1)"
    assert {"in_tissue", "array_row", "array_col"} <= set(ad.obs.columns)
    lib = ad.uns["spatial"]["demo1"]
    img, sf = lib["images"]["hires"], lib["scalefactors"]
    assert img.dtype == np.uint8 and img.shape[2] == 3
    assert sf["spot_diameter_fullres"] == pytest.approx(55.0) and 0 < sf["tissue_hires_scalef"] <= 1
    xy = np.round(ad.obsm["spatial"] * sf["tissue_hires_scalef"]).astype(int)
    at_spot = np.stack([img[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3].reshape(-1, 3).mean(0) for x, y in xy])
    in_patch = patches[:, 107:118, 107:118].reshape(len(xy), -1, 3).mean(1)
    assert (at_spot.min(1) < 235).mean() > 0.95          # the stored image is stained tissue under the spots
    r = np.corrcoef(at_spot.sum(1), in_patch.sum(1))[0, 1]
    assert r > 0.8, r                                    # and the same tissue the spot's patch shows: geometry is right


def test_anndata_of_a_measured_slice_carries_the_truth(demo, hinge_run, tmp_path):
    run_script("sample.py", "--run", hinge_run, "--data", demo / "data", "--samples", "2", "--out", tmp_path)
    import anndata
    ad = anndata.read_h5ad(tmp_path / "demo1.h5ad")
    with h5py.File(demo / "data" / "slices" / "demo1.h5", "r") as s:
        np.testing.assert_array_equal(ad.layers["truth"], s["expr"][()])


def test_evaluate_draws_maps_and_skips_metrics_without_truth(predicted_slide):
    p = run_script("evaluate.py", "--pred", predicted_slide / "pred", "--data", predicted_slide / "data",
                   "--out", predicted_slide / "eval")
    assert "no metrics" in p.stdout and "PCC" not in p.stdout
    assert (predicted_slide / "eval" / "predicted_demo1.png").stat().st_size > 20000
    assert not (predicted_slide / "eval" / "metrics.csv").exists()


def test_sample_under_torchrun_equals_one_process(demo, hinge_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--run-dir", str(hinge_run), "--data", str(demo / "data"), "--samples", "2", "--batch-size", "40"]
    subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args, "--out", str(tmp_path / "one")],
                   check=True, capture_output=True, env=env)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29541", os.path.join(ROOT, "sample.py"),
                        *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    with h5py.File(tmp_path / "one" / "demo1.h5", "r") as a, h5py.File(tmp_path / "two" / "demo1.h5", "r") as b:
        for key in ("pred", "std"):
            np.testing.assert_allclose(a[key][()], b[key][()], atol=1e-5)
        assert decode(a["barcode"]) == decode(b["barcode"])
    assert sorted(os.listdir(tmp_path / "two")) == ["demo1.h5", "demo1.h5ad"]  # the per-process parts are gone


def test_sample_warns_when_the_slide_scale_differs_from_training(demo, hinge_run, tmp_path):
    # as if scanned at twice the training resolution
    prepare_image(tmp_path / "data", demo / "data" / "images" / "demo1.tif",
                  extra=("--pixel-size", "0.5", "--spot-pitch-um", "300"))
    run_script("extract_features.py", "--data", tmp_path / "data", "--encoder", "stain")
    p = run_script("sample.py", "--run", hinge_run, "--data", tmp_path / "data", "--slices", "demo1", "--samples", "1",
                   "--out", tmp_path / "pred")
    assert "0.50 µm/px" in p.stderr and "1.00 µm/px" in p.stderr and "0.50x the width" in p.stderr


def test_rerun_writes_a_missing_anndata_twin_without_resampling(predicted_slide, hinge_run):
    h5, h5ad = predicted_slide / "pred" / "demo1.h5", predicted_slide / "pred" / "demo1.h5ad"
    before = os.path.getmtime(h5)
    os.remove(h5ad)                                      # as if interrupted between the two files
    run_script("sample.py", "--run", hinge_run, "--data", predicted_slide / "data", "--slices", "demo1",
               "--out", predicted_slide / "pred")
    assert h5ad.exists() and os.path.getmtime(h5) == before
    p = run_script("sample.py", "--run", hinge_run, "--data", predicted_slide / "data", "--slices", "demo1",
                   "--out", predicted_slide / "pred", check=False)
    assert_user_error(p, "demo1.h5 exists", "--overwrite")   # both complete: never silently replaced

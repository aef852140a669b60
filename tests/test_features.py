"""extract_features.py: official key names for UNI / CONCH / ResNet-50, the stain encoder on real
Her2ST, dihedral views, re-runs, torchrun sharding and bad weights."""
import glob
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from huggingface_hub import hf_hub_download
from PIL import Image

import checkpoints as C
import extract_features as X
from common import UserError
from conftest import HER2ST, ROOT, assert_user_error, lay_out_hub_cache, make_her2st, needs_shared, run_script

Image.MAX_IMAGE_PIXELS = None


def official_state_dict(name, net):
    sd = net.state_dict()
    if name == "conch":                                  # CoCa file: visual.* plus text tower, caption pooler, ...
        sd = {f"visual.{k}": v for k, v in sd.items()}
        sd.update({"visual.proj_contrast": torch.zeros(512, 512), "visual.ln_caption.weight": torch.ones(768),
                   "text.token_embedding.weight": torch.zeros(10, 768), "logit_scale": torch.zeros(())})
        sd = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    return sd


@pytest.mark.parametrize("name,dim,keys", [("uni", 1024, "blocks.23.ls2.gamma"),
                                           ("conch", 512, "visual.attn_pool_contrast.attn.k_proj_weight"),
                                           ("resnet50", 2048, "layer4.2.bn3.running_var")])
def test_neural_encoders_load_official_key_names(tmp_path, name, dim, keys):
    torch.manual_seed(0)
    src, size, _, d = X.build_encoder(name)
    sd = official_state_dict(name, src)
    flat = sd["state_dict"] if "state_dict" in sd else sd
    assert any(k.endswith(keys) for k in flat)
    torch.save(sd, tmp_path / "w.bin")
    enc = X.NeuralEncoder(name, str(tmp_path / "w.bin"), False, "cpu", amp=False)
    patches = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    out = enc(patches)
    assert out.shape == (2, dim) == (2, d) and np.isfinite(out).all()
    ref = X.NeuralEncoder(name, None, True, "cpu", amp=False)
    ref.net.load_state_dict(src.state_dict())
    np.testing.assert_allclose(out, ref(patches), rtol=1e-4, atol=1e-4)  # the loaded weights are the saved ones


def test_mis_shaped_weights_name_the_first_bad_key(tmp_path):
    net, *_ = X.build_encoder("resnet50")
    sd = net.state_dict()
    sd["fc.weight"] = torch.zeros(3)                       # unexpected key
    sd["layer1.0.conv1.weight"] = torch.zeros(5, 5, 1, 1)
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(UserError, match=r"layer1.0.conv1.weight has shape \(5, 5, 1, 1\) but resnet50 expects"):
        X.load_weights(net, "resnet50", str(tmp_path / "bad.bin"))


def test_dihedral_views_are_pils_transpose_ops():
    patch = np.random.default_rng(0).integers(0, 256, (1, 6, 6, 3), dtype=np.uint8)
    views = X.dihedral(patch)
    pil = Image.fromarray(patch[0])
    assert np.array_equal(views[0][0], patch[0])
    for k in range(7):
        np.testing.assert_array_equal(views[k + 1][0], np.asarray(pil.transpose(k)))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    make_her2st(root / "raw", n_slices=3)
    run_script("prepare_data.py", "--dataset", "her2st", "--raw", root / "raw", "--out", root / "data", "--n-top", 40)
    return root / "data"


def test_cli_stain_with_augment_and_rerun(small_data):
    run_script("extract_features.py", "--data", small_data, "--encoder", "stain", "--augment")
    files = sorted(glob.glob(str(small_data / "features" / "stain" / "*.h5")))
    assert [os.path.basename(f) for f in files] == ["A1.h5", "A2.h5", "A3.h5"]
    with h5py.File(files[0], "r") as f, h5py.File(small_data / "slices" / "A1.h5", "r") as s:
        assert f["embeddings"].shape == (30, 74) and f["embeddings_aug"].shape == (30, 8, 74)
        np.testing.assert_array_equal(f["embeddings_aug"][:, 0], f["embeddings"][()])
        assert list(f["barcode"][()]) == list(s["barcode"][()]) and f.attrs["weights"] == "none"
    mtimes = [os.path.getmtime(f) for f in files]
    run_script("extract_features.py", "--data", small_data, "--encoder", "stain", "--augment")
    assert mtimes == [os.path.getmtime(f) for f in files]   # finished slices are skipped


def test_cli_neural_needs_weights_or_random_init(small_data, tmp_path):
    p = run_script("extract_features.py", "--data", small_data, "--encoder", "uni", check=False)
    assert p.returncode == 2 and "MahmoodLab/UNI" in p.stderr and "--weights" in p.stderr
    assert not os.path.exists(small_data / "features" / "uni")
    p = run_script("extract_features.py", "--data", small_data, "--encoder", "conch",
                   "--weights", tmp_path / "nope.bin", check=False)
    assert p.returncode == 2 and "nope.bin" in p.stderr and "not found" in p.stderr
    run_script("extract_features.py", "--data", small_data, "--encoder", "resnet50", "--random-init",
               "--batch-size", "16")
    with h5py.File(small_data / "features" / "resnet50" / "A2.h5", "r") as f:
        assert f["embeddings"].shape == (30, 2048) and f.attrs["weights"] == "random-init"


def test_torchrun_two_processes_write_each_slice_once(small_data):
    out = small_data / "features" / "stain"
    shutil.rmtree(out, ignore_errors=True)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29531",
                        os.path.join(ROOT, "extract_features.py"), "--data", str(small_data), "--encoder", "stain"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 slices -> " in p.stdout and "1 slices -> " in p.stdout   # rank 0: A1, A3; rank 1: A2
    assert sorted(os.listdir(out)) == ["A1.h5", "A2.h5", "A3.h5"]


@needs_shared
def test_stain_features_on_real_c2_separate_tissue_and_vary(tmp_path):
    raw = tmp_path / "raw"                                # C2 alone, linked from the shared copy
    for sub, pat in [("ST-cnts", "C2.tsv.gz"), ("ST-spotfiles", "C2_selection.tsv")]:
        os.makedirs(raw / sub)
        os.symlink(os.path.join(HER2ST, sub, pat), raw / sub / pat)
    os.makedirs(raw / "ST-imgs" / "C")
    os.symlink(os.path.join(HER2ST, "ST-imgs", "C", "C2"), raw / "ST-imgs" / "C" / "C2")
    run_script("prepare_data.py", "--dataset", "her2st", "--raw", raw, "--out", tmp_path / "data")
    run_script("extract_features.py", "--data", tmp_path / "data", "--encoder", "stain")
    with h5py.File(tmp_path / "data" / "features" / "stain" / "C2.h5", "r") as f:
        emb = f["embeddings"][()]
    assert (emb.std(0) > 1e-4).mean() > 0.9               # most dimensions vary over the spots of C2
    img = Image.open(glob.glob(os.path.join(HER2ST, "ST-imgs", "C", "C2", "*.jpg"))[0]).convert("RGB")
    background = np.stack([np.asarray(img.crop((x, 50, x + 224, 274))) for x in (50, 300, 550)])
    bg = X.StainEncoder()(background)
    z = (bg - emb.mean(0)) / (emb.std(0) + 1e-6)
    assert np.median(np.abs(z).max(1)) > 5                # glass is far outside the tissue distribution
    frac = 34                                             # background-fraction feature of the whole patch
    assert bg[:, frac].min() > 0.9 > np.median(emb[:, frac])


# ----------------------------------------------------------------------------- weights by hub id

def test_weights_by_hub_id_come_from_the_cache_offline_and_only_with_the_prefix(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    net, *_ = X.build_encoder("resnet50")
    save_file(net.state_dict(), tmp_path / "model.safetensors")
    cache = tmp_path / "hub"
    digest = lay_out_hub_cache(cache, "timm/resnet50.a1_in1k",
                               {"model.safetensors": tmp_path / "model.safetensors"})["model.safetensors"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    make_her2st(tmp_path / "raw", n_slices=1, n_spots=6)
    data = tmp_path / "data"
    run_script("prepare_data.py", "--dataset", "her2st", "--raw", tmp_path / "raw", "--out", data, "--n-top", 40)
    cached = digest_of(cache)

    run_script("extract_features.py", "--data", data, "--encoder", "resnet50",
               "--weights", "hf-hub:timm/resnet50.a1_in1k")
    with h5py.File(data / "features" / "resnet50" / "A1.h5", "r") as f, h5py.File(data / "slices" / "A1.h5", "r") as s:
        assert f.attrs["weights"] == f"hf-hub:timm/resnet50.a1_in1k sha256:{digest}"  # the hub id and the file's hash
        emb, patches = f["embeddings"][()], s["img"][()]
    ref = X.NeuralEncoder("resnet50", str(tmp_path / "model.safetensors"), False, "cpu", amp=False)
    np.testing.assert_allclose(emb, ref(patches), rtol=1e-4, atol=1e-4)  # the cached file's weights were loaded
    assert digest_of(cache) == cached                   # nothing downloaded, nothing written into the cache

    p = run_script("extract_features.py", "--data", data, "--encoder", "uni", "--weights", "hf-hub:MahmoodLab/UNI",
                   check=False)
    assert_user_error(p, "hf-hub:MahmoodLab/UNI", "pytorch_model.bin is not in the Hugging Face cache", "login",
                      "https://huggingface.co/MahmoodLab/UNI", "pass its path")
    p = run_script("extract_features.py", "--data", data, "--encoder", "uni", "--weights", "MahmoodLab/UNI",
                   check=False)
    assert_user_error(p, "MahmoodLab/UNI: weights file not found")  # without the prefix: a path, never looked up
    assert digest_of(cache) == cached and not (data / "features" / "uni").exists()


def test_an_uncached_hub_id_without_the_hub_fails_at_once(tmp_path, monkeypatch):
    """Not in the cache and the hub's host refuses (a closed local port): the one-line error after asking the cache
    alone, not after hf_hub_download's half minute of retries against the network."""
    asked = []

    def download(*args, local_files_only=False, **kw):  # hf_hub_download, recording whether it may go online
        asked.append(local_files_only)
        return hf_hub_download(*args, local_files_only=local_files_only, **kw)
    monkeypatch.setattr(C, "hf_hub_download", download)
    monkeypatch.setattr(C.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(C.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C.constants, "HF_HUB_CACHE", str(tmp_path))
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(UserError, match="best_model.pt is not in the Hugging Face cache .* cannot be reached"):
        C.resolve_weights("hf-hub:someone/missing-model", "best_model.pt")
    assert asked == [True] and not os.listdir(tmp_path)


def digest_of(folder):
    return {os.path.relpath(p, folder): (os.path.islink(p), open(p, "rb").read() if os.path.isfile(p) else None)
            for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)}

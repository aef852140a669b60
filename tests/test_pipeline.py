"""pretrain.py -> train.py -> sample.py -> evaluate.py on the demo dataset: the protocol, resume,
DDP, generation and every bad input a user can give these stages."""
import json
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import checkpoints as C
from conftest import ROOT, TINY, assert_user_error, run_script, train



def test_pretrain_lowers_masked_mse_and_loads_as_cellfm(backbone):
    from safetensors import safe_open
    with safe_open(str(backbone), "pt") as f:
        meta = f.metadata()
    assert float(meta["val_mse_after"]) < 0.8 * float(meta["val_mse_before"])
    assert "demo1" not in meta["slices"].split(",")     # --exclude keeps the test slice out
    sd = C.load_cellfm(str(backbone))
    assert "encoder.1.post_norm2.weight" in sd and not any(k.startswith("cond_net") for k in sd)


def test_train_writes_checkpoints_and_log(hinge_run):
    log = pd.read_csv(hinge_run / "log.csv")
    assert list(log.columns) == ["epoch", "train_loss", "val_mse", "lr", "seconds"] and len(log) == 3
    ck = torch.load(hinge_run / "best.pt", weights_only=False)
    for key in ("config", "genes", "features", "test_slice", "opt", "sched", "rng", "state", "feat_mean"):
        assert key in ck
    assert ck["test_slice"] == "demo1" and "demo1" not in ck["train_slices"] and ck["variant"] == "hinge"


def test_scratch_validation_mse_goes_down(demo):
    out = demo / "scratch"
    train(demo, out, "--variant", "scratch", "--epochs", "8")
    val = pd.read_csv(out / "log.csv")["val_mse"].to_numpy()
    assert val[4:].min() < 0.85 * val[0]                # noisy epoch to epoch, clearly lower after a few


def test_resume_gives_the_same_weights(demo):
    a, b = demo / "full", demo / "cut"
    train(demo, a, "--variant", "scratch", "--epochs", "2")
    train(demo, b, "--variant", "scratch", "--epochs", "1")
    p = train(demo, b, "--variant", "scratch", "--epochs", "2", check=False)
    assert_user_error(p, "--resume")                     # a finished run is never silently overwritten
    train(demo, b, "--variant", "scratch", "--epochs", "2", "--resume")
    wa = torch.load(a / "last.pt", weights_only=False)["model"]
    wb = torch.load(b / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def torchrun_train(demo, out, *extra, port=29537):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port),
                           os.path.join(ROOT, "train.py"), "--data", str(demo / "data"), "--features", "stain",
                           "--test-slice", "demo1", "--out", str(out), *TINY, *map(str, extra)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_ddp_global_batch_uneven_shares_and_one_process_equivalence(demo, tmp_path):
    """--batch-size is the global batch under torchrun. 257 training spots (shares 129 / 128, a last batch of one
    spot) no longer hang a process in an all-reduce; with 256 (every batch splits 16 / 16) two gloo processes
    end the epoch with one process's weights and validation loss."""
    n = int((h5py.File(demo / "data" / "slices" / "demo4.h5")["expr"][()].sum(1) > 0).sum())
    fold = ["--exclude", "demo2,demo3", "--variant", "scratch", "--epochs", "1", "--batch-size", "32", "--dropout", "0"]
    p = torchrun_train(demo, tmp_path / "uneven", *fold, "--val-frac", (n - 257 + 0.25) / n)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "257 train" in p.stdout and len(pd.read_csv(tmp_path / "uneven" / "log.csv")) == 1
    even = ["--val-frac", (n - 256 + 0.25) / n]
    p = torchrun_train(demo, tmp_path / "two", *fold, *even, port=29538)
    assert p.returncode == 0 and "256 train" in p.stdout, p.stderr[-3000:]
    train(demo, tmp_path / "one", *fold, *even)
    w2, w1 = (torch.load(tmp_path / r / "last.pt", weights_only=False)["model"] for r in ("two", "one"))
    # round-off: the gradients are summed in another order, and Adam's normalised steps carry that into the weights
    assert max(float((w2[k] - w1[k]).abs().max()) for k in w1) < 1e-4
    assert not all(torch.equal(w1[k], v)
                   for k, v in torch.load(tmp_path / "uneven" / "last.pt", weights_only=False)["model"].items())
    v2, v1 = (pd.read_csv(tmp_path / r / "log.csv")["val_mse"][0] for r in ("two", "one"))
    assert abs(v2 - v1) < 1e-4


def test_sample_writes_predictions_and_evaluate_scores_them(demo, hinge_run):
    run_script("sample.py", "--run", hinge_run, "--data", demo / "data", "--steps", "5", "--samples", "2",
               "--record-steps", "0,4", "--save-samples", "--batch-size", "100")
    with h5py.File(hinge_run / "pred" / "demo1.h5", "r") as f, \
            h5py.File(demo / "data" / "slices" / "demo1.h5", "r") as s:
        N, G = s["expr"].shape
        assert f["pred"].shape == (N, G) and f["samples"].shape == (2, N, G) and f["steps"].shape == (2, N, G)
        np.testing.assert_allclose(f["samples"][()].astype(np.float32).mean(0), f["pred"][()], atol=0.02)
        assert f.attrs["K"] == 5 and f.attrs["spots_per_s"] > 0 and list(f["barcode"][()]) == list(s["barcode"][()])
        assert f["recorded_t"][()].tolist() == [50, 10]
    p = run_script("evaluate.py", "--pred", hinge_run / "pred", "--data", demo / "data")
    assert "PCC-50" in p.stdout and "mean ± std" in p.stdout
    ev = hinge_run / "eval"
    for f in ("metrics.csv", "per_gene.csv", "summary.json", "maps_demo1.png", "ssim_per_gene.png",
              "correlation_demo1.png", "steps_demo1.png"):
        assert (ev / f).stat().st_size > 0, f
    summary = json.load(open(ev / "summary.json"))
    assert set(summary["metrics"]) >= {"PCC-50", "MSE", "SSIM"}
    p = run_script("evaluate.py", "--compare", ev, ev)
    assert p.stdout.count("±") >= 16


def test_stopped_sampling_continues_to_the_same_rows(demo, hinge_run, tmp_path):
    """sample.py killed after its first piece and started again, here by two processes, generates only the missing
    pieces, and its file equals an uninterrupted run's; a stopped run's pieces are discarded when the settings
    changed."""
    args = ["--run-dir", hinge_run, "--data", demo / "data", "--steps", "2", "--samples", "2", "--batch-size", "1",
            "--save-samples"]                            # pieces of 64 spots

    def stopped(out):                                    # killed once its first piece is on disk
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args), "--out",
                                 out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (out / "demo1.h5.partial" / "piece00000.h5").exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.kill()
        assert proc.wait() != 0, "finished before it was stopped"
        return sorted(p.name for p in (out / "demo1.h5.partial").glob("piece*.h5"))

    run_script("sample.py", *args, "--out", tmp_path / "whole")
    kept = stopped(tmp_path / "stopped")
    with h5py.File(tmp_path / "whole" / "demo1.h5", "r") as w:
        whole = {k: w[k][()] for k in ("pred", "std", "samples", "barcode")}
        assert 1 <= len(kept) < len(w["pred"]) / 64
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29543", os.path.join(ROOT, "sample.py"),
                        *map(str, args), "--out", tmp_path / "stopped"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"continuing a stopped run, {len(kept)} pieces" in p.stdout
    assert not (tmp_path / "stopped" / "demo1.h5.partial").exists()
    with h5py.File(tmp_path / "stopped" / "demo1.h5", "r") as f:
        for k, v in whole.items():
            np.testing.assert_array_equal(f[k][()], v, err_msg=k)
    stopped(tmp_path / "reseeded")
    p = run_script("sample.py", *args, "--seed", "1", "--out", tmp_path / "reseeded")
    assert "discarding" in p.stdout
    with h5py.File(tmp_path / "reseeded" / "demo1.h5", "r") as f:
        assert not np.array_equal(f["samples"][:, :64], whole["samples"][:, :64])


@pytest.mark.parametrize("steps", ["0", "51"])
def test_sample_rejects_bad_step_budget(demo, hinge_run, steps, tmp_path):
    p = run_script("sample.py", "--run", hinge_run, "--data", demo / "data", "--steps", steps, "--out", tmp_path / "p",
                   check=False)
    assert_user_error(p, f"--steps {steps}", "T=50")
    assert not (tmp_path / "p").exists()


def test_sample_rejects_missing_slice_and_wrong_features(demo, hinge_run, tmp_path):
    p = run_script("sample.py", "--run", hinge_run, "--data", demo / "data", "--slices", "nope",
                   "--out", tmp_path / "p", check=False)
    assert_user_error(p, "nope")
    data2 = tmp_path / "data2"                          # same genes, but the features of another encoder dimension
    shutil.copytree(demo / "data", data2)
    with h5py.File(data2 / "features" / "stain" / "demo1.h5", "r+") as f:
        emb = f["embeddings"][()]
        del f["embeddings"]
        f["embeddings"] = emb[:, :10]
    p = run_script("sample.py", "--run", hinge_run, "--data", data2, "--out", tmp_path / "p", check=False)
    assert_user_error(p, "dimension 10", "expects 74")
    os.remove(data2 / "features" / "stain" / "demo1.h5")
    p = run_script("sample.py", "--run", hinge_run, "--data", data2, "--out", tmp_path / "p", check=False)
    assert_user_error(p, "no stain features for slice demo1", "extract_features.py")
    assert not (tmp_path / "p").exists()


def test_checkpoint_from_another_gene_set(demo, hinge_run, backbone, tmp_path):
    other = tmp_path / "other"
    run_script("prepare_data.py", "--out", other, "--n-top", "200")
    run_script("extract_features.py", "--data", other, "--encoder", "stain")
    p = run_script("sample.py", "--run", hinge_run, "--data", other, "--out", tmp_path / "p", check=False)
    assert_user_error(p, "other genes")
    assert not (tmp_path / "p").exists()
    p = run_script("train.py", "--data", other, "--features", "stain", "--test-slice", "demo1", "--out", tmp_path / "r",
                   *TINY, "--backbone-ckpt", backbone, check=False)
    assert_user_error(p, "backbone.safetensors", "mis-shaped", "gene_emb", "another gene vocabulary")
    assert not (tmp_path / "r" / "last.pt").exists()


def test_train_rejects_bad_fold_and_wrong_dimension_backbone(demo, backbone, tmp_path):
    p = train(demo, tmp_path / "r", "--test-slice", "demo9", "--variant", "scratch", check=False)
    assert_user_error(p, "demo9")
    p = run_script("train.py", "--data", demo / "data", "--features", "stain", "--test-slice", "demo1", "--out",
                   tmp_path / "r", "--preset", "small", "--backbone-ckpt", backbone, check=False)
    assert_user_error(p, "mis-shaped", "32-wide, 2-layer", "--preset tiny")   # the preset it was made with, named
    p = train(demo, tmp_path / "r", check=False)         # hinge needs a backbone
    assert_user_error(p, "--backbone-ckpt")
    assert not (tmp_path / "r" / "last.pt").exists()


def test_gauss_diff_trains_and_samples(demo, backbone, tmp_path):
    """The Gauss-Diff ablation (--objective gaussian) end to end: train.py's one loss call serves both diffusions."""
    train(demo, tmp_path / "r", "--backbone-ckpt", backbone, "--objective", "gaussian", "--epochs", "1")
    run_script("sample.py", "--run", tmp_path / "r", "--data", demo / "data", "--steps", "5", "--samples", "2",
               "--out", tmp_path / "p")
    with h5py.File(tmp_path / "p" / "demo1.h5", "r") as f:
        assert f["pred"].shape[0] == len(f["barcode"]) and np.isfinite(f["pred"][()]).all()


@pytest.mark.parametrize("fill", ["zero", "gauss"])
def test_pretrain_fills_hidden_genes_as_asked(fill):
    from pretrain import masked_value_loss
    seen = {}

    def net(x, visible):
        seen["x"], seen["vis"] = x, visible
        return torch.zeros_like(x)
    x0 = torch.rand(64, 50) + 5                          # every true value >= 5
    torch.manual_seed(0)
    masked_value_loss(net, x0, 0.5, fill)
    hidden = ~seen["vis"]
    assert torch.equal(seen["x"][~hidden], x0[~hidden]) and hidden.sum() > 1000
    v = seen["x"][hidden]
    assert (v == 0).all() if fill == "zero" else (abs(v.mean()) < 0.1 and abs(v.std() - 1) < 0.1)


def test_checkpoint_is_selected_after_the_curriculum(demo, backbone, tmp_path):
    # a curriculum epoch never saw mostly hidden genes: its low per-step loss must not make it best.pt
    train(demo, tmp_path / "r", "--backbone-ckpt", backbone, "--epochs", "8", "--curriculum-epochs", "5")
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=False)["state"]["epoch"]
    log = pd.read_csv(tmp_path / "r" / "log.csv")
    assert best > 2 and log.val_mse[log.epoch > 2].min() == pytest.approx(log.val_mse[log.epoch == best].item())


@pytest.mark.parametrize("script", ["prepare_data", "extract_features", "pretrain", "train", "sample", "evaluate",
                                    "baselines"])
def test_every_flag_has_help(script, monkeypatch):
    import argparse
    import importlib
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        importlib.import_module(script).main()
    assert [a.option_strings for a in parsers[0]._actions if not a.help] == []


@pytest.mark.parametrize("args, words", [(["--test-slices", "demo9"], ["--test-slices demo9", "not a slice"]),
                                         (["--dataset", "her2st"], ["--raw is missing"]),
                                         (["--predict", "x.svs"], ["--predict needs --run"])])
def test_run_all_names_the_users_flag_before_any_work(tmp_path, args, words):
    p = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh"), "--out", str(tmp_path / "out"), *args],
                       capture_output=True, text=True)
    assert_user_error(p, *words)
    assert not (tmp_path / "out").exists()               # nothing prepared, embedded or trained

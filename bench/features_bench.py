"""Patches per second of each encoder on this machine, random weights, fp32 and bf16 autocast.

    python bench/features_bench.py [--encoders stain,resnet50,conch,uni] [--patches 32]
Target: stain at least 200 patches/s on the 2-core development machine.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import extract_features as X  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--encoders", default="stain,resnet50,conch,uni")
p.add_argument("--patches", type=int, default=32, help="patches per neural measurement (stain uses 16x as many)")
a = p.parse_args()
rng = np.random.default_rng(0)
for name in a.encoders.split(","):
    for amp in ((False,) if name == "stain" else (False, True)):
        n = a.patches * (16 if name == "stain" else 1)
        patches = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
        enc = X.StainEncoder() if name == "stain" else X.NeuralEncoder(name, None, True, "cpu", amp)
        bs = 64 if name == "stain" else 8
        enc(patches[:bs])                                # warm-up
        t0 = time.time()
        for s in range(0, n, bs):
            enc(patches[s:s + bs])
        print(f"{name:<9} {'bf16' if amp else 'fp32'}: {n / (time.time() - t0):8.1f} patches/s")

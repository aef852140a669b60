"""Wall time and peak memory of prepare_data.py on the shared Her2ST copy (36 slices, 5 images).

    python bench/prepare_bench.py [--raw ../shared/data/her2st] [--vocab ../shared/data/cellfm/gene_info.csv]
Target: under 60 s and under 3 GB on the 2-core development machine.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--raw", default=os.path.join(SHARED, "her2st"))
p.add_argument("--vocab", default=os.path.join(SHARED, "cellfm", "gene_info.csv"))
a = p.parse_args()
with tempfile.TemporaryDirectory() as out:
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--dataset", "her2st", "--raw", a.raw,
                    "--vocab", a.vocab, "--out", out], check=True, stderr=subprocess.DEVNULL)
    secs = time.time() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs) / 2 ** 20
print(f"prepare_data.py her2st: {secs:.1f} s wall, peak RSS {peak_gb:.2f} GB, output {size_mb:.0f} MB "
      f"(targets: < 60 s, < 3 GB)")

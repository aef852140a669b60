"""The registry of the paper's slide-context peers: each method's name -> its Peer class (baselines.py --method).

The peers are reimplemented on frozen spot features: STFlow (ICML 2025), TRIPLEX (CVPR 2024) and MERGE
(CVPR 2025). baselines.py runs them on the same folds, validation spots and prediction format as every other
method (README, "Quality benchmark"):

    python baselines.py --data data/her2st --features stain --test-slice C2 --method stflow --out runs/q/stflow/pred

Each model sees whole slides: every spot's features serve as context, but only the training spots'
expression is ever an input or a target while it trains (harness.py). Where a model needs pixels (TRIPLEX's
and MERGE's trainable ResNet-18) it takes the spot's frozen features instead; each such change is one comment
at its line. A new peer is one file (its network and a Peer subclass declaring EPOCHS, PATIENCE and
GENERATIVE) and one line below.
"""
from .harness import Budget, Peer, Slide, SlideFeatures, fit, fold_slides, load_slide, train
from .merge import Merge
from .stflow import STFlow
from .triplex import Triplex

PEERS = {"stflow": STFlow, "triplex": Triplex, "merge": Merge}

__all__ = ["PEERS", "Budget", "Peer", "Slide", "SlideFeatures", "fit", "fold_slides", "load_slide", "train",
           "STFlow", "Triplex", "Merge"]

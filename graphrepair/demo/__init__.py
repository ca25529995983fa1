"""``graphrepair demo``: the whole story on a pair of small networks, offline, in well under a minute.

Default pair ("digits-mlp"): two MLPs (8 hidden layers of width 64, the REPAIR paper's MLP at
digits scale) trained from seeds 0 and 1 on scikit-learn's bundled 8x8 digits (1,437 training
images, 360 test images). Nothing is downloaded. The data (``demo/data.py``), the MLP
(``demo/model.py``) and the training loop (``demo/train.py``) live here, so the demo runs wherever
graphrepair is installed; the test fixtures reuse them.

The demo merges them at alpha = 0.5 naively, after alignment and after alignment + exact REPAIR,
measures each path over a grid of alphas (``study.run_study``), the per-layer variance collapse and
LLFC (``layers=True``), and writes into ``out_dir``:

    merged.onnx    the aligned + REPAIRed midpoint, verified with onnxruntime before it is kept
    barrier.png    accuracy and loss against alpha for the three paths
    layers.png     variance ratio and LLFC cosine per layer, aligned without and with REPAIR

Other pairs (``graphrepair demo --pair NAME``): ``PAIRS`` maps a name to a builder returning a
:class:`DemoPair`. When graphrepair runs from a source checkout (an editable install or PYTHONPATH),
the checkpoint pairs of the repository's ``fixtures.pairs`` (MNIST MLPs and ResNet) join them when
their files are present in ``fixtures/checkpoints/`` (``shipped_pairs``). An installed wheel has no
``fixtures`` and never imports one; the default never depends on them.
"""

from graphrepair.demo.run import (
    DEMO_ALPHA,
    OUTPUT_NAMES,
    PAIRS,
    DemoPair,
    DemoResult,
    available_pairs,
    digits_mlp_pair,
    first_examples,
    make_out_dir,
    prepare_out_dir,
    run_demo,
    shipped_pairs,
    write_outputs,
)

__all__ = ["DEMO_ALPHA", "OUTPUT_NAMES", "PAIRS", "DemoPair", "DemoResult", "available_pairs", "digits_mlp_pair",
           "first_examples", "make_out_dir", "prepare_out_dir", "run_demo", "shipped_pairs", "write_outputs"]

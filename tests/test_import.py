"""Nothing in the core, the NumPy backend or the CLI's parser imports an optional framework."""

import subprocess
import sys


def test_core_numpy_backend_and_cli_import_no_optional_framework():
    code = (
        "import sys, numpy as np\n"
        "import minrr, minrr.certify, minrr.certify.bounds, minrr.certify.margin, minrr.certify.radius, minrr.certify.smoothing\n"
        "import minrr.bundled, minrr.lda, minrr.hashing.hamming, minrr.hashing.detect, minrr.hashing.transforms\n"
        "import minrr.hashing.distance_models, minrr.hashing.hash_centers, minrr.scores, minrr.data.loaders\n"
        "import minrr.metrics.hashing, minrr.metrics.retrieval, minrr.metrics.clustering\n"
        "import minrr.metrics.detection, minrr.backends, minrr.backends.base, minrr.backends.numpy_backend\n"
        "import minrr.certify.halfspace, minrr.collapse, minrr.hashing.detection_baselines, minrr.options, minrr.progress\n"
        "import minrr.metrics.report, minrr.io, minrr.labels\n"
        "import minrr.cli.main\n"
        "minrr.cli.main.build_parser()\n"
        "b = minrr.backends.get_backend('numpy')\n"
        "b.sample_noisy(lambda x: x.reshape(len(x), -1), np.zeros((1, 2)), 0.5, 4)\n"
        "assert not minrr.backends.is_torch_tensor(np.zeros(1))\n"
        "print(','.join(m for m in ('torch', 'matplotlib', 'faiss', 'sklearn', 'dask', 'distributed')\n"
        "               if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

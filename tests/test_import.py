"""The core never imports torch (nor other optional frameworks)."""

import subprocess
import sys


def test_import_minrr_does_not_import_torch():
    code = (
        "import sys, minrr, minrr.certify, minrr.bounds, minrr.margin, minrr.radius, minrr.smoothing, "
        "minrr.bundled, minrr.cli.main, minrr.cli.certify, minrr.backends\n"
        "bad = [m for m in ('torch', 'matplotlib', 'faiss') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

"""Shared test settings (Hypothesis profiles sized for 2-core CI machines) and test data."""

import os

import minrr  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch or Numba load an OpenMP runtime)
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def act_cub_record():
    """COLO-TRIDE Table 1/2, ACT on CUB, as an attack record of raw outputs (fractions),
    with per-trial CA+ ranks."""
    return {
        "format": "minrr-attacks/1",
        "benign_r1": 0.275,
        "meta": {"model": "ACT", "dataset": "CUB"},
        "attacks": [
            {"attack": "CA+", "rank_before": [0.4, 0.6], "rank_after": [0.15, 0.16]},
            {"attack": "CA-", "rank_before": 0.0095, "rank_after": 0.377},
            {"attack": "QA+", "rank_before": 0.5, "rank_after": 0.151},
            {"attack": "QA-", "rank_before": 0.0102, "rank_after": 0.322},
            {"attack": "TMA", "cosine": 0.472},
            {"attack": "ES", "shift": 0.821, "r1_after": 0.111},
            {"attack": "LTM", "r1_after": 0.094},
            {"attack": "GTM", "r1_after": 0.149},
            {"attack": "GTT", "retained": 0.01, "params": {"eps": 8 / 255, "steps": 32}},
        ],
    }


def interrupt_after(monkeypatch, calls):
    """Make ``TorchBackend.sample_noisy`` raise KeyboardInterrupt after ``calls`` calls (a Ctrl-C
    in the middle of ``minrr certify --model``)."""
    from minrr.backends.torch_backend import TorchBackend

    real, count = TorchBackend.sample_noisy, {"n": 0}

    def flaky(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TorchBackend, "sample_noisy", flaky)

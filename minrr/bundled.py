"""The bundled default: certified Recall@1 on real images, with nothing to download.

Fashion-MNIST subset shipped in :mod:`minrr.data` (5,000 training images as
the exact gallery, 1,000 test images as queries, pixels in [0, 1]); for each
sigma an l2-normalised LDA embedding fitted on noise-augmented training data
(:func:`minrr.lda.fit_lda`), Gaussian noise sampled in NumPy, and
:func:`minrr.certify.certify` against the training images' embeddings.
"""

from __future__ import annotations


from .certify import CertifyResult, certify
from .data import fashion_mnist_subset
from .lda import fit_lda

from .options import DEFAULT_CANDIDATES, DEFAULT_RADII, DEFAULT_SAMPLES, DEFAULT_SIGMAS

__all__ = ["DEFAULT_SIGMAS", "DEFAULT_SAMPLES", "DEFAULT_RADII", "run_bundled"]


def run_bundled(sigmas=DEFAULT_SIGMAS, *, n_samples: int = DEFAULT_SAMPLES, alpha: float = 1e-3,
                bound: str = "empirical-bernstein", top_k: int = 1, radius_form: str = "phi",
                seed: int = 0, progress=None, certificate: str = "halfspace",
                candidates: int = DEFAULT_CANDIDATES) -> list[CertifyResult]:
    """Certify the bundled subset at each sigma; one :class:`CertifyResult` per sigma.

    ``progress``, if given, is called with each sigma before its work starts.
    """
    data = fashion_mnist_subset()
    train = data["train_images"].reshape(len(data["train_images"]), -1) / 255.0
    test = data["test_images"].reshape(len(data["test_images"]), -1) / 255.0
    results = []
    for sigma in sigmas:
        if progress is not None:
            progress(sigma)
        model = fit_lda(train, data["train_labels"], noise_variance=sigma ** 2)
        estimate = model.smoothed_estimate(test, sigma, n_samples, seed=seed)
        results.append(certify(estimate, data["test_labels"], sigma=sigma, gallery=model.embed(train),
                               gallery_labels=data["train_labels"], alpha=alpha, bound=bound,
                               top_k=top_k, radius_form=radius_form, certificate=certificate,
                               candidates=candidates))
    return results

"""Deep hashing and UMCD's attack detection on binary codes.

``hamming`` (packing and exact Hamming search), ``hash_centers`` (CSQ's class centres),
``distance_models`` (Binomial and Gaussian models of Hamming distances), ``detect`` (UMCD's
criteria and their joint calibration), ``transforms`` (the denoising transforms of the third
criterion) and ``detection_baselines`` (the detectors UMCD is compared with).
"""

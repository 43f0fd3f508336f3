"""Retrieval metrics: hashing mAP conventions over Hamming rankings, and the
metric-learning metrics (Recall@k, mAP, mAP@R, NMI) over Euclidean rankings."""

"""Backends for the heavy parts: embedding batches and sampling noisy embeddings."""

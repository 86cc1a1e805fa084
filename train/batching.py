"""Batches of training images: one numpy batcher (Keras `fit`, calibration, pruning, QAT) and
the tf.data pipeline that feeds a `tf.distribute` strategy one shard per replica and worker."""
from __future__ import annotations

import numpy as np


def class_weights(y: np.ndarray, mode: str) -> tuple[float, float]:
    """(weight of class 0, weight of class 1); "balanced" gives each class equal total weight."""
    if mode == "none":
        return 1.0, 1.0
    n, pos = len(y), max(1, int(y.sum()))
    return n / (2 * (n - pos)), n / (2 * pos)


def diagnosis_weights(dx: np.ndarray, classes: int, mode: str) -> np.ndarray:
    """Per-class weights of the diagnosis loss, from the known diagnoses (dx >= 0). "balanced"
    uses the square root of inverse frequency (full inverse frequency would weight the 60
    dermatofibromas ~70x a nevus), normalised to a mean weight of 1 per image."""
    known = dx[dx >= 0]
    if mode == "none" or not len(known):
        return np.ones(classes, np.float32)
    counts = np.bincount(known, minlength=classes).astype(np.float64)
    w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0)
    return (w / (w[known].mean())).astype(np.float32)


def batches(pixels, y: np.ndarray, idx: np.ndarray, size: int, rng: np.random.Generator,
            weights: tuple[float, float] = (1.0, 1.0), epochs: int = 1, shuffle: bool = True,
            drop_last: bool = True):
    """(float32 pixels, labels, per-image class weights) for `epochs` passes over `idx`.
    Indices are sorted inside a batch (memmap reads in file order). Labels may be (N, 2)
    (target, diagnosis: train.optim.keras_objective); the weights then come from column 0."""
    w0, w1 = weights
    for _ in range(epochs):
        order = rng.permutation(idx) if shuffle else np.asarray(idx)
        stop = len(order) - size + 1 if drop_last else len(order)
        for s in range(0, max(stop, 0), size):
            b = np.sort(order[s:s + size])
            t = y[b] if y.ndim == 1 else y[b, 0]
            yield np.asarray(pixels[b], np.float32), y[b], np.where(t > 0.5, w1, w0).astype(np.float32)


# --------------------------------------------------------------------------- distributed
def epoch_order(idx: np.ndarray, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shuffled indices as (steps, global_batch): the same on every worker (same seed),
    cut to whole global batches so every step has one static shape (no retracing)."""
    order = np.random.default_rng([seed, epoch]).permutation(idx)
    steps = len(order) // global_batch
    return order[:steps * global_batch].reshape(steps, global_batch)


def worker_share(table: np.ndarray, worker: int, workers: int) -> np.ndarray:
    """Worker `worker`'s columns of every global batch, flattened in step order: the workers'
    shares of one step are disjoint and together make the global batch."""
    per_worker = table.shape[1] // workers
    return table[:, worker * per_worker:(worker + 1) * per_worker].reshape(-1)


def distributed_dataset(strategy, pixels, y: np.ndarray, idx: np.ndarray, global_batch: int, seed: int,
                        epoch: int, dx: np.ndarray | None = None):
    """One epoch of (uint8 images, float32 labels, int32 diagnoses; -1 unknown or no `dx`) for `strategy`: each replica gets
    global_batch / replicas images per step, each worker its own share of every global batch.
    Feeds `strategy.run` through `distribute_datasets_from_function` (also for one device)."""
    import tensorflow as tf
    if global_batch % strategy.num_replicas_in_sync:
        raise ValueError(f"batch_size {global_batch} does not split over {strategy.num_replicas_in_sync} replicas")
    table = epoch_order(idx, global_batch, seed, epoch)
    size = tuple(pixels.shape[1:])
    dx = np.full(len(y), -1, np.int32) if dx is None else np.asarray(dx, np.int32)

    def gather(ids):
        ids = np.sort(ids)
        return np.asarray(pixels[ids], np.uint8), y[ids].astype(np.float32), dx[ids]

    def dataset_fn(ctx: tf.distribute.InputContext):
        per_replica = ctx.get_per_replica_batch_size(global_batch)
        share = worker_share(table, ctx.input_pipeline_id, ctx.num_input_pipelines)
        ds = tf.data.Dataset.from_tensor_slices(share).batch(per_replica, drop_remainder=True)
        ds = ds.map(lambda ids: tf.numpy_function(gather, [ids], (tf.uint8, tf.float32, tf.int32)))
        ds = ds.map(lambda x, t, d: (tf.ensure_shape(x, (per_replica,) + size), tf.ensure_shape(t, (per_replica,)),
                                     tf.ensure_shape(d, (per_replica,))))
        return ds.prefetch(2)

    options = tf.distribute.InputOptions(experimental_fetch_to_device=False)
    return strategy.distribute_datasets_from_function(dataset_fn, options), len(table)

"""What one optimisation step is: the schedule, the weight EMA and the distributed train step."""
from __future__ import annotations

from . import tfenv  # noqa: F401
import tensorflow as tf
import tf_keras as keras

import numpy as np

from .data import DIAGNOSES
from .model import augment


def lr_schedule(peak: float, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to `peak`, then cosine decay to 0 at `total_steps` (Keras's own)."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    return keras.optimizers.schedules.CosineDecay(0.0, max(1, total_steps - warmup_steps),
                                                  warmup_target=peak, warmup_steps=warmup_steps)


class EMA:
    """Exponential moving average of the trainable weights (evaluated and shipped)."""

    def __init__(self, variables, decay: float):
        self.variables, self.decay = list(variables), decay
        self.shadow = [tf.Variable(v, trainable=False) for v in self.variables]
        self.backup = [tf.Variable(v, trainable=False) for v in self.variables]

    def update(self, step):
        d = tf.minimum(self.decay, (1.0 + tf.cast(step, tf.float32)) / (10.0 + tf.cast(step, tf.float32)))
        for s, v in zip(self.shadow, self.variables):
            s.assign(d * s + (1 - d) * v)

    def swap_in(self):
        for b, s, v in zip(self.backup, self.shadow, self.variables):
            b.assign(v)
            v.assign(s)

    def swap_out(self):
        for b, v in zip(self.backup, self.variables):
            v.assign(b)


def per_image_loss(out, t, d, class_weight: tuple[float, float], dx_w=None, diagnosis_weight: float = 1.0):
    """The training objective per image: class-weighted binary cross-entropy of the melanoma
    column (out[:, 0]) and, for a multi-task model, the class-weighted diagnosis cross-entropy
    of the softmax columns (out[:, 1:]), left out where the diagnosis is unknown (d = -1)."""
    w0, w1 = class_weight
    t = tf.cast(t, tf.float32)
    loss = keras.losses.binary_crossentropy(t[:, None], out[:, :1]) * tf.where(t > 0.5, w1, w0)
    if dx_w is not None:
        d = tf.cast(d, tf.int32)
        d0 = tf.maximum(d, 0)
        ce = keras.losses.sparse_categorical_crossentropy(d0, out[:, 1:])
        loss += diagnosis_weight * ce * tf.where(d >= 0, tf.gather(tf.constant(dx_w, tf.float32), d0), 0.0)
    return loss


def keras_objective(y, dx, idx, weighting: str, diagnosis_weight: float = 1.0):
    """(loss, labels, per-class weights) for Keras `fit` on batching.batches (pruning and QAT
    fine-tunes): the binary loss with class weights as sample weights, or for a multi-task
    model (dx given) the same objective as the training loop, labels (N, 2) = (target, dx)."""
    from .batching import class_weights, diagnosis_weights
    if dx is None:
        return "binary_crossentropy", y, class_weights(y[idx], weighting)
    cw = class_weights(y[idx], weighting)
    dx_w = diagnosis_weights(dx[idx], len(DIAGNOSES), weighting)

    def loss(y_true, y_pred):
        return per_image_loss(y_pred, y_true[:, 0], y_true[:, 1], cw, dx_w, diagnosis_weight)
    return loss, np.stack([y, dx], axis=1).astype(np.float32), (1.0, 1.0)


def make_train_step(model, optimizer, strategy, *, global_batch: int, class_weight: tuple[float, float],
                    weight_decay: float = 0.0, augment_gen: tf.random.Generator | None = None,
                    ema: EMA | None = None, diagnosis_weights=None, diagnosis_weight: float = 1.0):
    """A tf.function (per-replica images, labels) -> global mean loss, for batches from
    `batching.distributed_dataset`. Each replica averages its share over the *global* batch
    and scales the L2 term by 1/replicas, so the summed gradients equal one device's on the
    whole batch (https://www.tensorflow.org/tutorials/distribute/custom_training#define_the_loss_function).
    A multi-task model (output columns 1.. the diagnosis softmax) adds the diagnosis cross-entropy,
    weighted per class by `diagnosis_weights` and left out where the diagnosis is unknown (-1)."""
    kernels = [v for v in model.trainable_variables if "kernel" in v.name]

    def replica_step(x, t, d):
        if augment_gen is not None:
            x = augment(x, augment_gen)
        with tf.GradientTape() as tape:
            out = model(tf.cast(x, tf.float32), training=True)
            per_image = per_image_loss(out, t, d, class_weight, diagnosis_weights, diagnosis_weight)
            loss = tf.nn.compute_average_loss(per_image, global_batch_size=global_batch)
            if weight_decay:
                l2 = weight_decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels])
                loss += tf.nn.scale_regularization_loss(l2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(x, t, d):
        loss = strategy.reduce("SUM", strategy.run(replica_step, args=(x, t, d)), axis=None)
        if ema is not None:
            ema.update(optimizer.iterations)
        return loss

    return train_step


def sync_from_first_replica(strategy, variables) -> None:
    """Give every replica (on every worker) replica 0's values. MultiWorkerMirroredStrategy
    mirrors variables only when they are created: weights set afterwards on each worker
    (phase 1, --init-from, a restored checkpoint) could differ in their last bits, and the same
    summed gradient would then never bring them back together."""
    if strategy.num_replicas_in_sync == 1:
        return
    variables = list(variables)

    def first_values():
        ctx = tf.distribute.get_replica_context()
        keep = tf.equal(ctx.replica_id_in_sync_group, 0)
        return ctx.all_reduce("SUM", [tf.where(keep, v, tf.zeros_like(v)) for v in variables])
    values = strategy.run(first_values)
    for v, x in zip(variables, values):
        v.assign(strategy.experimental_local_results(x)[0])


def agree(strategy, value: float) -> float:
    """The mean of `value` over all replicas and workers, so every worker takes the same branch
    (early stopping: one worker leaving the loop alone would leave the others waiting for ever)."""
    if strategy.num_replicas_in_sync == 1:
        return float(value)
    per_replica = strategy.run(lambda: tf.constant(float(value), tf.float32))
    return float(strategy.reduce("MEAN", per_replica, axis=None))

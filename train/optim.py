"""What one optimisation step is: the schedule, the weight EMA and the distributed train step."""
from __future__ import annotations

from . import tfenv  # noqa: F401
import tensorflow as tf
import tf_keras as keras

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


def make_train_step(model, optimizer, strategy, *, global_batch: int, class_weight: tuple[float, float],
                    weight_decay: float = 0.0, augment_gen: tf.random.Generator | None = None,
                    ema: EMA | None = None):
    """A tf.function (per-replica images, labels) -> global mean loss, for batches from
    `batching.distributed_dataset`. Each replica averages its share over the *global* batch
    and scales the L2 term by 1/replicas, so the summed gradients equal one device's on the
    whole batch (https://www.tensorflow.org/tutorials/distribute/custom_training#define_the_loss_function)."""
    w0, w1 = class_weight
    kernels = [v for v in model.trainable_variables if "kernel" in v.name]

    def replica_step(x, t):
        if augment_gen is not None:
            x = augment(x, augment_gen)
        with tf.GradientTape() as tape:
            p = model(tf.cast(x, tf.float32), training=True)[:, 0]
            per_image = keras.losses.binary_crossentropy(t[:, None], p[:, None]) * tf.where(t > 0.5, w1, w0)
            loss = tf.nn.compute_average_loss(per_image, global_batch_size=global_batch)
            if weight_decay:
                l2 = weight_decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels])
                loss += tf.nn.scale_regularization_loss(l2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(x, t):
        loss = strategy.reduce("SUM", strategy.run(replica_step, args=(x, t)), axis=None)
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

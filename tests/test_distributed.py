"""Training that really distributes: the loop's own train step and input pipeline
(train.optim.make_train_step, train.batching.distributed_dataset) under MirroredStrategy on two
logical CPUs, and under MultiWorkerMirroredStrategy with two worker processes on localhost.
Each runs in a fresh process: logical devices and TF_CONFIG must be set before TensorFlow starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from train.batching import epoch_order, worker_share

from .conftest import REPO, free_port

LOSS_TOLERANCE = 1e-5  # float32 sums in a different order
WEIGHT_TOLERANCE = 1e-5

COMMON = r'''
import json, sys
import numpy as np
from train import tfenv
import tensorflow as tf
import tf_keras as keras
from train.batching import distributed_dataset
from train.optim import make_train_step, sync_from_first_replica

def tiny_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 128, offset=-1)(inp)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(x))

rng = np.random.default_rng(0)
PIXELS = rng.integers(0, 256, (64, 16, 16, 3)).astype(np.uint8)
PIXELS[:, 0, 0, 0] = np.arange(64)  # each image carries its index in one pixel: who saw what
Y = (rng.random(64) < 0.3).astype(np.float32)
IDX = np.arange(64)

def train(strategy, steps, init=None, sync=False):
    with strategy.scope():
        model = tiny_model()
        if init is not None:
            model.set_weights(init)
        opt = keras.optimizers.SGD(0.5)
    if sync:
        sync_from_first_replica(strategy, model.weights)
    step = make_train_step(model, opt, strategy, global_batch=8, class_weight=(1.0, 2.0), weight_decay=1e-2)
    dataset, _ = distributed_dataset(strategy, PIXELS, Y, IDX, 8, seed=0, epoch=0)
    losses, seen = [], []
    for i, (x, t, d) in enumerate(dataset):
        if i == steps:
            break
        seen.append(sorted(int(v) for r in strategy.experimental_local_results(x) for v in r.numpy()[:, 0, 0, 0]))
        losses.append(float(step(x, t, d)))
    return losses, [w.numpy() for w in model.weights], seen
'''

MIRRORED = COMMON + r'''
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
init = tiny_model().get_weights()
one_loss, one_w, _ = train(tf.distribute.OneDeviceStrategy("/cpu:0"), 3, init)
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
two_loss, two_w, _ = train(mirrored, 3, init)
print(json.dumps({"replicas": mirrored.num_replicas_in_sync, "one_loss": one_loss, "two_loss": two_loss,
                  "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(one_w, two_w)),
                  "weights_moved": max(float(np.abs(a - b).max()) for a, b in zip(init, one_w))}))
'''

WORKER = COMMON + r'''
strategy = tf.distribute.MultiWorkerMirroredStrategy()
index = strategy.cluster_resolver.task_id
# each worker starts from different weights (as after a phase 1 run on each); the sync must fix it
init = [w + 0.05 * index for w in tiny_model().get_weights()]
losses, weights, seen = train(strategy, 4, init, sync=True)
np.savez(sys.argv[1], *weights)
print(json.dumps({"workers": strategy.cluster_resolver.cluster_spec().num_tasks("worker"), "losses": losses,
                  "seen": seen}))
'''


def python(script: str, *args: str, env=None, timeout=240) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})


def result(proc: subprocess.Popen, timeout=240) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_mirrored_two_replicas_equal_one_device_on_the_same_global_batch():
    r = result(python(MIRRORED))
    print(f"\nMirroredStrategy (2 logical CPUs) vs one device, 3 steps of batch 8: "
          f"loss diff {max(abs(a - b) for a, b in zip(r['one_loss'], r['two_loss'])):.2e}, "
          f"max weight diff {r['max_weight_diff']:.2e} (weights moved {r['weights_moved']:.2e})")
    assert r["replicas"] == 2 and len(r["one_loss"]) == 3
    assert r["weights_moved"] > 1e-3  # the steps really trained
    assert all(abs(a - b) < LOSS_TOLERANCE for a, b in zip(r["one_loss"], r["two_loss"]))
    assert r["max_weight_diff"] < WEIGHT_TOLERANCE


def test_each_worker_gets_its_own_share_of_every_global_batch():
    table = epoch_order(np.arange(100), 8, seed=0, epoch=3)
    shares = [worker_share(table, w, 2).reshape(-1, 4) for w in range(2)]
    for step in range(len(table)):
        assert not set(shares[0][step]) & set(shares[1][step])
        assert set(shares[0][step]) | set(shares[1][step]) == set(table[step])
    assert not np.array_equal(table, epoch_order(np.arange(100), 8, seed=0, epoch=4))  # reshuffled per epoch


def test_two_worker_processes_train_in_step(tmp_path):
    """A real two-process MultiWorkerMirroredStrategy run on localhost. The workers start from
    different weights (as each worker's own phase 1 could leave them), the sync gives both
    worker 0's; both finish with the same weights, each having seen its own half of every batch."""
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = [python(WORKER, str(tmp_path / f"w{i}.npz"),
                    env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
             for i in range(2)]
    results = [result(p) for p in procs]
    assert [r["workers"] for r in results] == [2, 2]
    assert results[0]["losses"] == results[1]["losses"]  # the reduced (global) loss of every step
    table = epoch_order(np.arange(64), 8, seed=0, epoch=0)
    for step, (a, b) in enumerate(zip(results[0]["seen"], results[1]["seen"])):
        assert len(a) == len(b) == 4 and not set(a) & set(b)  # each worker its own half
        assert sorted(a + b) == sorted(table[step].tolist())  # together: the global batch
    w0, w1 = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    diff = max(float(np.abs(w0[k] - w1[k]).max()) for k in w0.files)
    print(f"\nMultiWorkerMirroredStrategy, 2 processes x 4 steps: max weight difference between workers {diff:.1e}")
    assert diff == 0.0

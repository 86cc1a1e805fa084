"""Import before TensorFlow: tfmot 0.8 needs Keras 2 (tf_keras), selected by this variable.

TensorFlow is then imported here with the C++ side's start-up chatter muted (oneDNN and CUDA
notices, absl's "log messages before InitializeLog", "failed call to cuInit" on machines
without a GPU): it goes straight to file descriptor 2, so Python cannot filter it. Errors
still surface: a failed import raises as usual once stderr is restored.
"""
import logging
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep C++ info logs out of the progress output


def import_tensorflow_quietly() -> None:
    if "tensorflow" in sys.modules:
        return
    from edge.runner import quiet_stderr
    with quiet_stderr():
        import tensorflow as tf
        tf.config.list_physical_devices("GPU")  # CUDA is probed (and complains) here, once
    tf.get_logger().setLevel(logging.ERROR)  # e.g. "compiled metrics have yet to be built" after load_model


import_tensorflow_quietly()

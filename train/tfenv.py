"""Import before TensorFlow: tfmot 0.8 needs Keras 2 (tf_keras), selected by this variable."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep C++ info logs out of the progress output

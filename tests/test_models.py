"""Model registry and model zoo: shapes, parameter counts, layer order, specs and trust."""

from __future__ import annotations

import sys
import uuid

import pytest
import torch
from torch import nn

from adq_deploy import models
from adq_deploy.models import ArchitectureError, UnknownModelError


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def edge_layers(model: nn.Module) -> tuple[str, str]:
    names = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    return names[0], names[-1]


def assert_one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg and "\r" not in msg
    return msg


@pytest.fixture
def scratch_name():
    """A registry name that is removed again after the test."""
    name = f"test_model_{uuid.uuid4().hex[:8]}"
    yield name
    if name in models.available():
        models.unregister(name)


# --- the zoo ---------------------------------------------------------------------------------


def test_available_lists_the_zoo():
    assert {"resnet20", "resnet18", "small_cnn"} <= set(models.available())
    assert models.available() == sorted(models.available())


@pytest.mark.parametrize(
    ("name", "kwargs", "shape", "out"),
    [
        ("resnet20", {"in_channels": 1}, (2, 1, 28, 28), (2, 10)),
        ("resnet20", {}, (2, 3, 32, 32), (2, 10)),
        ("resnet20", {"shortcut": "B", "in_channels": 1}, (2, 1, 28, 28), (2, 10)),
        ("resnet20", {"num_classes": 100}, (1, 3, 32, 32), (1, 100)),
        ("resnet18", {}, (1, 3, 64, 64), (1, 1000)),
        ("resnet18", {"num_classes": 10, "in_channels": 1}, (2, 1, 32, 32), (2, 10)),
        ("small_cnn", {}, (2, 1, 28, 28), (2, 10)),
        ("small_cnn", {"in_channels": 3, "width": 8}, (2, 3, 32, 32), (2, 10)),
    ],
)
def test_output_shapes(name, kwargs, shape, out):
    model = models.get(name, **kwargs).eval()
    with torch.no_grad():
        y = model(torch.randn(*shape))
    assert tuple(y.shape) == out
    assert torch.isfinite(y).all()
    assert models.architecture_of(model) == {"name": name, "kwargs": kwargs}


def test_resnet20_parameter_count():
    # Convs have no bias; each BN has weight + bias (2 * C); shortcut A has no parameters.
    stem = 3 * 16 * 9 + 2 * 16  # 432 + 32
    block = lambda cin, c: cin * c * 9 + c * c * 9 + 2 * (2 * c)  # noqa: E731
    stage1 = 3 * block(16, 16)  # 3 * 4,672 = 14,016
    stage2 = block(16, 32) + 2 * block(32, 32)  # 13,952 + 2 * 18,560 = 51,072
    stage3 = block(32, 64) + 2 * block(64, 64)  # 55,552 + 2 * 73,984 = 203,520
    fc = 64 * 10 + 10  # 650
    expected = stem + stage1 + stage2 + stage3 + fc
    assert expected == 269_722
    assert n_params(models.resnet20()) == 269_722
    # One input channel: the stem loses 2 * 16 * 9 = 288 weights.
    assert n_params(models.resnet20(in_channels=1)) == 269_722 - 288
    # Shortcut B adds 1x1 conv + BN projections at stages 2 and 3: (512 + 64) + (2,048 + 128).
    assert n_params(models.resnet20(shortcut="B")) == 269_722 + 576 + 2_176


def test_resnet18_parameter_count_matches_torchvision():
    assert n_params(models.resnet18()) == 11_689_512


def test_small_cnn_parameter_count():
    w = 32
    convs = 1 * w * 9 + w * w * 9 + w * 2 * w * 9 + 2 * w * 2 * w * 9 + 2 * w * 4 * w * 9
    bns = 2 * (w + w + 2 * w + 2 * w + 4 * w)
    fc = 4 * w * 10 + 10
    assert convs + bns + fc == 140_458
    assert n_params(models.small_cnn()) == 140_458


@pytest.mark.parametrize(
    ("name", "kwargs", "first", "last"),
    [
        ("resnet20", {}, "conv1", "fc"),
        ("resnet20", {"shortcut": "B"}, "conv1", "fc"),
        ("resnet18", {}, "conv1", "fc"),
        ("small_cnn", {}, "features.0.0", "fc"),
    ],
)
def test_stem_first_classifier_last(name, kwargs, first, last):
    model = models.get(name, **kwargs)
    assert edge_layers(model) == (first, last)
    assert isinstance(model.get_submodule(last), nn.Linear)


def test_resnet20_shortcut_a_is_parameter_free_and_pads_channels():
    model = models.resnet20(in_channels=1)
    block = model.layer2[0]
    assert isinstance(block.shortcut, models.ShortcutA)
    assert n_params(block.shortcut) == 0
    x = torch.randn(1, 16, 28, 28)
    y = block.shortcut(x)
    assert tuple(y.shape) == (1, 32, 14, 14)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    # Odd sizes: subsampling and the stride-2 conv agree (7 -> 4).
    assert tuple(model.layer3[0](torch.randn(1, 32, 7, 7)).shape) == (1, 64, 4, 4)
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="shortcut"):
        models.resnet20(shortcut="C")


def test_resnet20_exports_to_onnx(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = models.resnet20(in_channels=1).eval()
    x = torch.randn(1, 1, 28, 28)
    path = tmp_path / "r20.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(y), model(x), atol=1e-4)


# --- the registry ----------------------------------------------------------------------------


def test_register_user_factory(scratch_name):
    @models.register(scratch_name)
    def tiny(features: int = 4, classes: int = 2) -> nn.Module:
        return nn.Sequential(nn.Flatten(1), nn.Linear(features, classes))

    assert scratch_name in models.available()
    model = models.get(scratch_name, features=6, classes=3)
    assert tuple(model(torch.randn(2, 6)).shape) == (2, 3)
    spec = models.architecture_of(model)
    assert spec == {"name": scratch_name, "kwargs": {"features": 6, "classes": 3}}
    assert model.adq_architecture == spec
    # architecture_of hands out a copy.
    spec["kwargs"]["features"] = 99
    assert models.architecture_of(model)["kwargs"]["features"] == 6
    assert models.architecture_of(nn.Linear(2, 2)) is None


def test_register_call_form_and_duplicates(scratch_name):
    def a() -> nn.Module:
        return nn.Linear(2, 2)

    def b() -> nn.Module:
        return nn.Linear(3, 3)

    assert models.register(scratch_name, a) is a
    assert models.register(scratch_name, a) is a  # same factory again: fine
    with pytest.raises(ValueError, match="already registered") as info:
        models.register(scratch_name, b)
    assert_one_line(info.value)
    with pytest.raises(ValueError, match="already registered"):
        models.register("resnet20", b)
    models.register(scratch_name, b, overwrite=True)
    assert models.get(scratch_name).in_features == 3
    # Distinct lambdas share a qualname but are different factories.
    models.register(scratch_name, lambda: nn.Linear(4, 4), overwrite=True)
    with pytest.raises(ValueError, match="already registered"):
        models.register(scratch_name, lambda: nn.Linear(5, 5))


def test_unknown_name_lists_available():
    with pytest.raises(KeyError) as info:
        models.get("resnet21")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, UnknownModelError)
    msg = assert_one_line(info.value)
    for name in ("resnet18", "resnet20", "small_cnn"):
        assert name in msg
    assert not msg.startswith("'")  # not KeyError's quoted repr


def test_build_from_registry_spec():
    model = models.build({"name": "resnet20", "kwargs": {"in_channels": 1, "num_classes": 7}})
    assert tuple(model(torch.randn(1, 1, 28, 28)).shape) == (1, 7)
    assert models.architecture_of(model) == {
        "name": "resnet20",
        "kwargs": {"in_channels": 1, "num_classes": 7},
    }
    # A recorded spec round-trips, and kwargs may be left out.
    again = models.build(models.architecture_of(model))
    assert again.state_dict().keys() == model.state_dict().keys()
    assert models.architecture_of(models.build({"name": "small_cnn"})) == {
        "name": "small_cnn",
        "kwargs": {},
    }


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A module on sys.path, not yet imported, whose import writes a marker file."""
    name = f"adq_user_factory_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported.txt"
    (tmp_path / f"{name}.py").write_text(
        "import pathlib\n"
        "from torch import nn\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "NOT_CALLABLE = 3\n"
        "def make(features=4, classes=2):\n"
        "    return nn.Linear(features, classes)\n"
        "def not_a_module():\n"
        "    return 'nope'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert name not in sys.modules
    yield name, marker
    sys.modules.pop(name, None)


def test_build_factory_spec_refused_without_allow_import(factory_module):
    name, marker = factory_module
    target = f"{name}:make"
    with pytest.raises(ArchitectureError) as info:
        models.build({"factory": target, "kwargs": {"features": 5}})
    msg = assert_one_line(info.value)
    assert target in msg
    assert "allow_import=True" in msg and "--allow-import" in msg
    assert name not in sys.modules
    assert not marker.exists()


def test_build_factory_spec_with_allow_import(factory_module):
    name, marker = factory_module
    spec = {"factory": f"{name}:make", "kwargs": {"features": 5, "classes": 3}}
    model = models.build(spec, allow_import=True)
    assert marker.exists() and name in sys.modules
    assert isinstance(model, nn.Linear) and model.in_features == 5 and model.out_features == 3
    assert models.architecture_of(model) == spec


@pytest.mark.parametrize(
    ("attr", "kwargs", "match"),
    [
        ("missing", {}, "no attribute"),
        ("NOT_CALLABLE", {}, "not callable"),
        ("not_a_module", {}, "not a torch.nn.Module"),
        ("make", {"depth": 3}, "does not accept"),
    ],
)
def test_build_factory_spec_bad_targets(factory_module, attr, kwargs, match):
    name, _ = factory_module
    with pytest.raises(ArchitectureError, match=match) as info:
        models.build({"factory": f"{name}:{attr}", "kwargs": kwargs}, allow_import=True)
    assert_one_line(info.value)


def test_build_factory_spec_missing_module():
    with pytest.raises(ArchitectureError, match="cannot import") as info:
        models.build({"factory": "adq_no_such_module_xyz.sub:make"}, allow_import=True)
    assert_one_line(info.value)


@pytest.mark.parametrize(
    "spec",
    [
        None,
        ["resnet20"],
        "resnet20",
        {},
        {"kwargs": {}},
        {"name": "resnet20", "factory": "a.b:c"},
        {"name": 20},
        {"name": "resnet20", "kwargs": [1]},
        {"name": "resnet20", "kwargs": {1: 2}},
        {"name": "resnet20", "kwargs": {"depth": 3}},
        {"name": "resnet20", "extra": 1},
        {"name": "no_such_model"},
        {"factory": 5},
        {"factory": "no_colon"},
        {"factory": "a.b:"},
        {"factory": ":make"},
        {"factory": "a b:make"},
        {"factory": "a.b:c\nimport os"},
        {"factory": "a.b:c\n"},
        {"factory": "a..b:c"},
    ],
)
@pytest.mark.parametrize("allow_import", [False, True])
def test_malformed_specs(spec, allow_import):
    with pytest.raises(ArchitectureError) as info:
        models.build(spec, allow_import=allow_import)
    assert isinstance(info.value, ValueError)
    assert_one_line(info.value)

"""Checkpoint format v1: bit-exact round trip, safe loading, and one clear error per bad file."""

from __future__ import annotations

import os
import sys
import textwrap
import zipfile

import pytest
import torch
from torch import nn

from adq_deploy import models
from adq_deploy.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    checkpoint_dict,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from adq_deploy.quant import QuantConfig, QuantConv2d, layer_table, quantize_model

META = {
    "input_shape": [1, 28, 28],
    "mean": [0.286],
    "std": [0.353],
    "class_names": list("abcdefghij"),
}


def trained_like(model: nn.Module, steps: int = 3) -> nn.Module:
    """Move every parameter, buffer and codebook away from its init, as training would."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for i in range(steps):
        x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(i))
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture
def qmodel() -> nn.Module:
    torch.manual_seed(0)
    m = models.get("resnet20", num_classes=10, in_channels=1)
    names = [r.name for r in layer_table(m)]
    config = QuantConfig(w_bits=3, a_bits=2, layer_bits={names[1]: 2, names[2]: 4})
    return trained_like(quantize_model(m, config))


def test_round_trip_is_bit_exact(qmodel, tmp_path):
    path = save_checkpoint(qmodel, tmp_path / "ck.pt", metrics={"adq_top1": 91.5}, **META)
    ck = load_checkpoint(path)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(qmodel(x), ck.model(x))
    assert not ck.model.training
    for (ka, va), (kb, vb) in zip(
        qmodel.state_dict().items(), ck.model.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)
    assert ck.layers == checkpoint_dict(qmodel, **META)["layers"]
    assert ck.input == {"shape": [1, 28, 28], "mean": [0.286], "std": [0.353]}
    assert ck.class_names == list("abcdefghij")
    assert ck.metrics["adq_top1"] == 91.5
    assert 2 < ck.metrics["avg_bits_param_weighted"] < 4
    assert ck.provenance["torch"] == torch.__version__
    assert ck.quant_config.layer_bits == {
        r.name: r.w_bits for r in layer_table(qmodel) if r.role == "body"
    }


def test_codebooks_survive_training_and_reload(qmodel, tmp_path):
    conv = next(m for m in qmodel.modules() if isinstance(m, QuantConv2d))
    path = save_checkpoint(qmodel, tmp_path / "ck.pt", **META)
    loaded = next(m for m in load_checkpoint(path).model.modules() if isinstance(m, QuantConv2d))
    assert torch.equal(conv.weight_quant.codebook, loaded.weight_quant.codebook)
    # Rebuilding from the (different) float init must not be what we got back.
    fresh = conv.weight_quant.codebook.clone()
    conv.weight_quant.reset(torch.randn_like(conv.weight))
    assert not torch.equal(fresh, conv.weight_quant.codebook)


def test_float_model_round_trip(tmp_path):
    m = trained_like(models.get("small_cnn"))
    ck = load_checkpoint(save_checkpoint(m, tmp_path / "f.pt", **META))
    assert ck.quant_config is None
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(m(x), ck.model(x))


def test_raw_dict_is_weights_only_loadable(qmodel, tmp_path):
    path = save_checkpoint(qmodel, tmp_path / "ck.pt", **META)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "adq-checkpoint" and raw["version"] == FORMAT_VERSION
    assert set(raw) >= {
        "architecture",
        "quant_config",
        "layers",
        "state_dict",
        "input",
        "class_names",
        "metrics",
        "provenance",
    }


def test_save_is_atomic_on_failure(qmodel, tmp_path):
    target = tmp_path / "ck.pt"
    target.write_bytes(b"previous")
    bad = dict(META, metrics={"x": object()})
    with pytest.raises(TypeError):
        save_checkpoint(qmodel, target, **bad)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_model_without_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="architecture"):
        save_checkpoint(nn.Linear(2, 2), tmp_path / "x.pt", input_shape=[2])


def _message(path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


class Evil:
    """Pickles to a call of os.system: what a malicious checkpoint looks like."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "adq-checkpoint", "version": 1, "payload": Evil(marker)}, path)
    assert "nothing in it was run" in _message(path)
    assert not marker.exists()


def test_truncated_file(qmodel, tmp_path):
    path = save_checkpoint(qmodel, tmp_path / "ck.pt", **META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _message(path)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "truncated/corrupt" in _message(text)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 3)
    msg = _message(noise)
    assert "not a torch checkpoint" in msg or "truncated/corrupt" in msg
    assert "code" not in msg
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    assert "not an adq-deploy checkpoint" in _message(other)
    assert "no such file" in _message(tmp_path / "missing.pt")
    assert "not a file" in _message(tmp_path)


def test_unknown_version(qmodel, tmp_path):
    raw = checkpoint_dict(qmodel, **META)
    raw["version"] = 7
    torch.save(raw, tmp_path / "v7.pt")
    assert "unsupported checkpoint version 7" in _message(tmp_path / "v7.pt")


@pytest.mark.parametrize("key", ["architecture", "state_dict", "layers", "input", "provenance"])
def test_missing_key(qmodel, tmp_path, key):
    raw = checkpoint_dict(qmodel, **META)
    del raw[key]
    torch.save(raw, tmp_path / "m.pt")
    assert f"missing key '{key}'" in _message(tmp_path / "m.pt")


def test_wrong_types_and_shapes(qmodel, tmp_path):
    raw = checkpoint_dict(qmodel, **META)
    raw["state_dict"]["conv1.weight"] = "not a tensor"
    torch.save(raw, tmp_path / "t.pt")
    assert "not a tensor" in _message(tmp_path / "t.pt")
    raw = checkpoint_dict(qmodel, **META)
    key = next(k for k in raw["state_dict"] if k.endswith("codebook"))
    raw["state_dict"][key] = torch.zeros(99)
    torch.save(raw, tmp_path / "s.pt")
    assert "has shape (99,)" in _message(tmp_path / "s.pt")
    raw = checkpoint_dict(qmodel, **META)
    raw["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(raw, tmp_path / "u.pt")
    assert "unexpected" in _message(tmp_path / "u.pt")
    raw = checkpoint_dict(qmodel, **META)
    raw["input"]["shape"] = [1, -28]
    torch.save(raw, tmp_path / "i.pt")
    assert "input.shape" in _message(tmp_path / "i.pt")


def test_layer_bits_mismatch(qmodel, tmp_path):
    raw = checkpoint_dict(qmodel, **META)
    name = next(n for n, e in raw["layers"].items() if e["role"] == "float" or e["role"] == "first")
    raw["layers"][name]["w_bits"] = 4
    torch.save(raw, tmp_path / "b.pt")
    assert "do not match" in _message(tmp_path / "b.pt")


def test_read_checkpoint_builds_nothing(qmodel, tmp_path):
    raw = read_checkpoint(save_checkpoint(qmodel, tmp_path / "ck.pt", **META))
    assert raw["architecture"]["name"] == "resnet20"


def test_factory_architecture_needs_permission(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    pkg = tmp_path / "userpkg_ckpt_test.py"
    pkg.write_text(
        textwrap.dedent(f"""
        import pathlib
        from torch import nn
        pathlib.Path({str(marker)!r}).write_text("imported")
        def make(width=4):
            return nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.Conv2d(width, width, 3),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(width * 24 * 24, 10))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = {"factory": "userpkg_ckpt_test:make", "kwargs": {"width": 4}}
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 24 * 24, 10),
    )
    quantize_model(m, QuantConfig(w_bits=2, skip_first=False))
    path = save_checkpoint(m, tmp_path / "user.pt", architecture=arch, **META)
    msg = _message(path)
    assert "userpkg_ckpt_test:make" in msg and "allow_import" in msg
    assert not marker.exists() and "userpkg_ckpt_test" not in sys.modules
    ck = load_checkpoint(path, allow_import=True)
    assert marker.exists()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), ck.model(x))
    sys.modules.pop("userpkg_ckpt_test", None)


def test_zip_container_members(qmodel, tmp_path):
    path = save_checkpoint(qmodel, tmp_path / "ck.pt", **META)
    with zipfile.ZipFile(path) as z:
        assert any(n.endswith("data.pkl") for n in z.namelist())

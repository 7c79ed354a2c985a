"""The shared weights module: reading files, naming leaves, the missing / unexpected / wrong-shape report."""

import pickle
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rfdit.weights import check_tensors, fill, named_leaves, read_tensors, torch_load, write_tensors
from helpers import require


class Tiny(eqx.Module):
    weight: jax.Array
    layers: tuple[jax.Array, ...]
    table: dict[str, jax.Array]
    activation: str = eqx.field(static=True)
    scale: float = 0.5  # a non-array leaf, kept as it is


def tiny() -> Tiny:
    return Tiny(jnp.ones((2, 3)), (jnp.zeros(4), jnp.zeros((1, 4))), {"rows": jnp.arange(3.0)}, "gelu")


def test_named_leaves_join_attributes_indices_and_keys_with_dots():
    names = named_leaves(tiny())
    assert list(names) == ["weight", "layers.0", "layers.1", "table.rows", "scale"]
    assert names["scale"] == 0.5


def test_write_and_read_tensors_round_trip_bfloat16_without_torch(tmp_path, monkeypatch):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, ml_dtypes.bfloat16)}
    path = write_tensors(tmp_path / "sub" / "w.safetensors", tensors, metadata={"format": "pt"})
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]  # no partial file left behind
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails: safetensors must not need it
    back = read_tensors(path)
    assert back["b"].dtype == ml_dtypes.bfloat16
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value)


def test_read_tensors_corrupt_safetensors_says_so(tmp_path):
    path = write_tensors(tmp_path / "w.safetensors", {"a": np.zeros((64, 64), np.float32)})
    path.write_bytes(path.read_bytes()[:100])  # an interrupted download
    with pytest.raises(ValueError, match=r"Could not read .*w\.safetensors as safetensors: .*truncated or corrupt"):
        read_tensors(path)


def test_read_tensors_pickle_without_torch_says_what_to_do(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    path.write_bytes(b"never read")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"w\.pt \(a PyTorch pickle\) needs torch, but torch is not installed\."):
        read_tensors(path)
    with pytest.raises(ImportError, match="needs torch, but torch is not installed. Convert elsewhere"):
        read_tensors(path, torch_advice="Convert elsewhere.")


def test_read_tensors_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown weights format '\.npz'.*expected \.safetensors or a PyTorch"):
        read_tensors(tmp_path / "w.npz")


def test_read_tensors_torch_pickles_keep_dtypes_and_refuse_code(tmp_path):
    torch = require("torch", "reading a PyTorch pickle needs it")
    state = {"w": torch.arange(6.0).reshape(2, 3), "h": torch.ones(3, dtype=torch.bfloat16),
             "n": torch.tensor(7), "t": torch.arange(4.0)[::2]}
    torch.save(state, tmp_path / "w.pth")
    back = read_tensors(tmp_path / "w.pth")
    assert {name: str(value.dtype) for name, value in back.items()} == {
        "w": "float32", "h": "bfloat16", "n": "int64", "t": "float32"}
    np.testing.assert_array_equal(back["t"], [0.0, 2.0])

    (tmp_path / "broken.pt").write_bytes((tmp_path / "w.pth").read_bytes()[:50])
    with pytest.raises(ValueError, match=r"with torch\.load\(weights_only=True\): .*truncated or corrupt"):
        read_tensors(tmp_path / "broken.pt")

    (tmp_path / "code.pt").write_bytes(pickle.dumps({"w": pytest.raises}))  # a global that is not a tensor
    with pytest.raises(ValueError, match="pickles objects other than tensors, containers"):
        torch_load(tmp_path / "code.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list; expected a state dict"):
        read_tensors(tmp_path / "list.pt")
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match="'step' is not a tensor but a int"):
        read_tensors(tmp_path / "mixed.pt")


def test_check_tensors_reports_missing_unexpected_and_wrong_shapes():
    expected = {"a": (2, 3), "b": (4,), "c": (5,)}
    tensors = {"a": np.zeros((3, 2)), "c": np.zeros(5), "extra": np.zeros(1)}
    with pytest.raises(ValueError) as info:
        check_tensors(expected, tensors, source="w.safetensors", target="the tiny model", advice="Check the config.")
    assert str(info.value) == (
        "The tensors in w.safetensors do not fit the tiny model: missing b; unexpected extra; "
        "wrong shape a (expected (2, 3), got (3, 2)). Check the config."
    )
    many = {f"x{i}": (1,) for i in range(8)}
    with pytest.raises(ValueError, match=r"missing x0, x1, x2, x3, x4, \.\.\. \(8 in all\)\. Do this\.$"):
        check_tensors(many, {}, source="s", target="t", advice="Do this.")
    check_tensors(expected, {"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros(5)}, source="s", target="t",
                  advice="")


def test_fill_replaces_array_leaves_by_name_and_casts_to_their_dtype():
    skeleton = eqx.filter_eval_shape(tiny)
    tensors = {"weight": np.full((2, 3), 2.0), "layers.0": np.arange(4, dtype=ml_dtypes.bfloat16),
               "layers.1": np.ones((1, 4), np.float32), "table.rows": np.zeros(3, np.float32)}
    model = fill(skeleton, tensors, source="s", target="t", advice="")
    assert model.activation == "gelu" and model.scale == 0.5
    assert model.weight.dtype == jnp.float32 and float(model.weight[0, 0]) == 2.0
    np.testing.assert_array_equal(model.layers[0], np.arange(4.0))
    with pytest.raises(ValueError, match=r"missing table\.rows; wrong shape weight \(expected \(2, 3\), got \(3,\)\)"):
        broken = {**tensors, "weight": np.zeros(3)}
        del broken["table.rows"]
        fill(skeleton, broken, source="s", target="t", advice="")


def test_load_export_reports_tensors_that_do_not_fit_its_config(tmp_path, getkey):
    import json

    import rfdit
    from rfdit.checkpoint import CheckpointError, export_model, load_export

    cfg = rfdit.DiTConfig.preset("debug", image_size=8, in_channels=1, patch_size=2, num_classes=10, depth=1,
                                 hidden_size=32, num_heads=2)
    model = rfdit.DiT(cfg, key=getkey())
    export_model(model, tmp_path)
    loaded, _ = load_export(tmp_path)
    assert eqx.tree_equal(loaded, model)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["num_classes"] = 12
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"do not fit the model that .*config\.json describes: wrong shape "
                                              r"label_table \(expected \(13, 32\), got \(11, 32\)\)"):
        load_export(tmp_path)

import json

import pytest

from services.adapters import AdapterError, current, ensure_published, list_current, publish

from .conftest import tiny_adapter


def adapter(tmp_path, tag):
    return tiny_adapter(tmp_path / f"src-{tag}", tag)


def test_publish_versions_and_current(tmp_path):
    root = tmp_path / "reg"
    assert publish(root, "st-s", adapter(tmp_path, "a")) == 1
    assert publish(root, "st-s", adapter(tmp_path, "b")) == 2
    version, path = current(root, "st-s")
    assert version == 2 and json.loads((path / "adapter_config.json").read_text())["tag"] == "b"
    assert json.loads((root / "st-s" / "v0001" / "adapter_config.json").read_text())["tag"] == "a"  # old versions stay
    publish(root, "st-d", adapter(tmp_path, "c"))
    assert list_current(root) == {"st-d": 1, "st-s": 2}
    assert not list((root / "st-s").glob(".incoming-*"))


def test_ensure_published_reuses_a_version_holding_the_same_files(tmp_path):
    root = tmp_path / "reg"
    a, b = adapter(tmp_path, "a"), adapter(tmp_path, "b")
    assert ensure_published(root, "st-d", a) == 1
    assert ensure_published(root, "st-d", a) == 1  # already current
    assert ensure_published(root, "st-d", b) == 2  # other files: a new version
    # the first run again after the second: its version is current again, and no copy of it is added
    assert ensure_published(root, "st-d", a) == 1 and current(root, "st-d")[0] == 1
    assert sorted(p.name for p in (root / "st-d").glob("v*")) == ["v0001", "v0002"]
    assert ensure_published(root, "st-d", b) == 2 and current(root, "st-d")[0] == 2
    (a / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes()[:-1] + b"\x01")
    assert ensure_published(root, "st-d", a) == 3  # a changed byte is another adapter


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 65])
def test_bad_names(tmp_path, name):
    with pytest.raises(AdapterError, match="invalid adapter name"):
        publish(tmp_path, name, adapter(tmp_path, "a"))


def test_not_an_adapter_and_unknown(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="missing"):
        publish(tmp_path / "reg", "x", tmp_path / "empty")
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        current(tmp_path / "reg", "nope")


def _cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("fault, message", [
    (lambda d: _cut(d / "adapter_model.safetensors", -7), "cut or padded"),  # a half-copied file
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 3), "too short"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\xff" * 64), "exceeds the file"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "not a JSON adapter config"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 3}'), "do not pair at rank 3"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING", "r": 2}'), "not a LoRA config"),
])
def test_a_corrupt_adapter_is_refused_at_publish_and_the_current_version_stays(tmp_path, fault, message):
    root = tmp_path / "reg"
    assert publish(root, "st-d", adapter(tmp_path, "good")) == 1
    bad = adapter(tmp_path, "bad")
    fault(bad)
    with pytest.raises(AdapterError, match=message):
        publish(root, "st-d", bad)
    assert current(root, "st-d")[0] == 1 and not list((root / "st-d").glob("v0002"))
    assert not list((root / "st-d").glob(".incoming-*"))


def test_an_adapter_for_another_base_is_refused_by_its_shapes(tmp_path, model_path):
    """SmolLM2-135M's q_proj maps 576 -> 576 and its k_proj 576 -> 192: an adapter of other shapes would fail in
    the replica (or, worse, in every replica that loads it), so the registry refuses it."""
    root = tmp_path / "reg"
    fits = tiny_adapter(tmp_path / "fits", shapes=(("model.layers.0.self_attn.q_proj", 576, 576),
                                                   ("model.layers.0.self_attn.k_proj", 576, 192)))
    assert publish(root, "st-s", fits, base_model=model_path) == 1
    wide = tiny_adapter(tmp_path / "wide", shapes=(("model.layers.0.self_attn.k_proj", 576, 576),))
    with pytest.raises(AdapterError, match=r"k_proj: the adapter maps 576 -> 576, the base weight is 576 -> 192"):
        publish(root, "st-s", wide, base_model=model_path)
    elsewhere = tiny_adapter(tmp_path / "elsewhere", shapes=(("model.layers.99.mlp.up_proj", 576, 1536),))
    with pytest.raises(AdapterError, match="adapts no weight of the base model"):
        publish(root, "st-s", elsewhere, base_model=model_path)
    assert current(root, "st-s")[0] == 1

import pytest

from services.adapters import AdapterError, current, list_current, publish


def adapter(tmp_path, tag):
    d = tmp_path / f"src-{tag}"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 8, "tag": "%s"}' % tag)
    (d / "adapter_model.safetensors").write_bytes(tag.encode())
    return d


def test_publish_versions_and_current(tmp_path):
    root = tmp_path / "reg"
    assert publish(root, "st-s", adapter(tmp_path, "a")) == 1
    assert publish(root, "st-s", adapter(tmp_path, "b")) == 2
    version, path = current(root, "st-s")
    assert version == 2 and (path / "adapter_model.safetensors").read_bytes() == b"b"
    assert (root / "st-s" / "v0001" / "adapter_model.safetensors").read_bytes() == b"a"  # old versions stay
    publish(root, "st-d", adapter(tmp_path, "c"))
    assert list_current(root) == {"st-d": 1, "st-s": 2}
    assert not list((root / "st-s").glob(".incoming-*"))


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

"""What a LoRA adapter directory must hold before the registry publishes it (a bad adapter must never serve).

Checked without loading a tensor: `adapter_config.json` is a PEFT LoRA config with a rank; the safetensors
header is whole (its byte ranges cover the file exactly, so a half-copied file fails), every tensor is a
`lora_A`/`lora_B` weight of that rank; with the base model given, each pair's shapes match the base module it
adapts (A: rank x in, B: out x rank), read from the base's own safetensors headers.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_HEADER_MAX = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class AdapterFileError(ValueError):
    pass


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header, after checking that the header's byte ranges cover the
    data exactly (a truncated or padded file is refused)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_HEADER_MAX, size - 8):
            raise AdapterFileError(f"{path}: header length {n} exceeds the file ({size} bytes): not safetensors, or cut")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterFileError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: the safetensors header is not a mapping")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: [int(d) for d in v["shape"]] for k, v in tensors.items()}
    except (KeyError, TypeError, ValueError, IndexError):
        raise AdapterFileError(f"{path}: a tensor entry lacks shape or data_offsets") from None
    if 8 + n + end != size:
        raise AdapterFileError(f"{path}: its tensors end at byte {8 + n + end} but the file has {size}: cut or padded")
    return shapes


def _config_rank(path: Path) -> int | None:
    """The config's rank; None when it sets a rank per module (`rank_pattern`), so only A/B pairing is checked."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: not a JSON adapter config ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA" or not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise AdapterFileError(f"{path}: not a LoRA config with a positive integer rank `r`")
    return None if cfg.get("rank_pattern") else cfg["r"]


def _base_shapes(base_model: str) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for f in sorted(Path(base_model).glob("*.safetensors")):
        shapes.update(safetensors_shapes(f))
    return shapes


def verify_adapter(src: str | Path, base_model: str | None = None) -> None:
    """AdapterFileError naming the file and what is wrong with it, if anything is."""
    src = Path(src)
    rank = _config_rank(src / "adapter_config.json")
    weights = src / "adapter_model.safetensors"
    shapes = safetensors_shapes(weights)
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        m = _LORA.match(name)
        if m is None:
            raise AdapterFileError(f"{weights}: tensor {name!r} is not a LoRA A/B weight")
        pairs.setdefault(m["module"], {})[m["ab"]] = shape
    if not pairs:
        raise AdapterFileError(f"{weights}: no LoRA weights")
    base = _base_shapes(base_model) if base_model else {}
    for module, ab in sorted(pairs.items()):
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1] or rank not in (None, a[0]):
            raise AdapterFileError(f"{weights}: {module}: lora_A {a} / lora_B {b} do not pair at rank {rank or a and a[0]}")
        if base:
            target = base.get(f"{module}.weight")
            if target is None:
                raise AdapterFileError(f"{weights}: {module} adapts no weight of the base model {base_model}")
            if [b[0], a[1]] != target:
                raise AdapterFileError(f"{weights}: {module}: the adapter maps {a[1]} -> {b[0]}, the base weight is "
                                       f"{target[1]} -> {target[0]}")

"""PyTorch pickles of pretrained weights -> safetensors: the one explicit step that reads a pickle.

Published encoder weights are often pickles: facebook/hubert-base-ls960's main branch holds only
pytorch_model.bin. Unpickling can run code, so loading weights never does it
(groupemotion_core.weights.pretrained); a user converts a file they chose, once, with
`groupemotion weights convert SRC DEST`, and from then on only safetensors are read.

- The pickle is read by torch's weights-only unpickler alone (`torch.load(weights_only=True)`),
  which rebuilds tensors and plain containers and refuses any other object, so nothing in the
  file runs. Its earlier releases had code-execution flaws: torch older than 2.10 is refused.
- Inputs are bounded (MAX_PICKLE_BYTES, MAX_JSON_BYTES); the output is written beside its final
  name, read back, compared bit for bit with every tensor loaded, and only then renamed into place.
- Tensor names are kept as they are: the library that loads the safetensors maps legacy names
  (transformers) or drops a classifier (timm) exactly as it would for the pickle.

Layouts: a directory in the hub layout (pytorch_model.bin, config.json, preprocessor_config.json,
as `hf download` leaves it) becomes a directory with model.safetensors and the same JSON files;
a single .pth/.bin/.pt file (a timm checkpoint, possibly wrapped in {"state_dict": ...}) becomes
DEST itself when DEST ends in .safetensors, else DEST/model.safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.torch_version import TorchVersion

from groupemotion_core.errors import GroupEmotionError

MIN_TORCH = "2.10"
# HuBERT X-Large, the largest encoder this model takes, is a 3.9 GB pickle.
MAX_PICKLE_BYTES = 4 << 30
MAX_JSON_BYTES = 1 << 20
PICKLE_NAME = "pytorch_model.bin"
WEIGHTS_NAME = "model.safetensors"
JSON_NAMES = ("config.json", "preprocessor_config.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Keys under which a training checkpoint (timm's train.py, many others) nests the model's weights.
_NESTED_KEYS = ("state_dict", "model")


@dataclass(frozen=True)
class Converted:
    """What `convert` wrote: the safetensors file, its sha256 and tensor count, the JSON copied."""

    weights: Path
    sha256: str
    tensors: int
    copied: tuple[str, ...]


def convert(src: str | os.PathLike, dest: str | os.PathLike) -> Converted:
    """Convert the pickle at `src` (a hub-layout directory or a single file) to safetensors at `dest`."""
    require_safe_torch()
    src, dest = Path(src), Path(dest)
    if src.is_dir():
        if dest.suffix == ".safetensors":
            raise GroupEmotionError("bad_argument", f"{src} is a directory: it converts to a directory, not "
                                                    f"to the file {dest}")
        pickle_file, json_files = src / PICKLE_NAME, [src / n for n in JSON_NAMES if (src / n).is_file()]
        if not pickle_file.is_file():
            raise GroupEmotionError("bad_weights", f"{src}: no {PICKLE_NAME} in this directory (the hub layout)")
        out = dest / WEIGHTS_NAME
    elif src.is_file():
        if src.suffix not in _PICKLE_SUFFIXES:
            raise GroupEmotionError("bad_weights", f"{src}: expected a {'/'.join(_PICKLE_SUFFIXES)} pickle "
                                                   "or a directory holding pytorch_model.bin")
        pickle_file, json_files = src, []
        out = dest if dest.suffix == ".safetensors" else dest / WEIGHTS_NAME
    else:
        raise GroupEmotionError("not_found", f"{src} does not exist")

    texts = {f.name: _read_json(f) for f in json_files}
    targets = [out, *(out.parent / name for name in texts)]
    taken = [str(t) for t in targets if t.exists()]
    if taken:
        raise GroupEmotionError("exists", f"{', '.join(taken)}: already there; remove or choose another DEST")

    state = _state_dict(_load_pickle(pickle_file), pickle_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        try:
            save_file(_storable(state), str(tmp), metadata={"format": "pt"})
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise GroupEmotionError("bad_weights", f"{pickle_file}: its tensors cannot be stored as "
                                                   f"safetensors ({str(e).splitlines()[0]})") from None
        _verify(tmp, state)
        for name, text in texts.items():
            (out.parent / name).write_bytes(text)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return Converted(out, sha256_file(out), len(state), tuple(texts))


def require_safe_torch(version: str = torch.__version__) -> None:
    """Refuse torch releases whose weights-only unpickler could be made to run code."""
    if TorchVersion(version) < MIN_TORCH:
        raise GroupEmotionError("old_torch", f"torch {version} is older than {MIN_TORCH}, whose weights-only "
                                             f"unpickler is the first this converter trusts; upgrade torch")


def _load_pickle(path: Path) -> object:
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise GroupEmotionError("bad_weights", f"{path} is {size / 2**30:.1f} GiB, more than the "
                                               f"{MAX_PICKLE_BYTES / 2**30:.0f} GiB this converter reads")
    try:
        with warnings.catch_warnings():  # torch's advice on pickle protocols is not for our users
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message advises weights_only=False; what matters here is what it refused.
        found = [line.strip() for line in str(e).splitlines() if "nsupported" in line]
        detail = f" ({found[0]})" if found else ""
        raise GroupEmotionError("bad_weights", f"{path}: refused by torch's weights-only unpickler{detail}: it is "
                                               "not a plain PyTorch state dict; nothing in it was run") from None
    except (EOFError, RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GroupEmotionError("bad_weights", f"{path}: not a PyTorch pickle ({first})") from None


def _state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping in a loaded pickle, unwrapped from a training checkpoint if need be."""
    if isinstance(obj, dict):
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is not None and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = nested
    if not isinstance(obj, dict) or not obj:
        raise GroupEmotionError("bad_weights", f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    bad = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise GroupEmotionError("bad_weights", f"{path}: entry {bad!r} holds {type(obj[bad]).__name__}, "
                                               "not a tensor; expected a state dict")
    # DDP-wrapped models save their weights under "module."; the model itself has no such prefix.
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _storable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores each tensor on its own: give views and tensors sharing memory their own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        shared = storage in seen or tensor.untyped_storage().nbytes() != tensor.nbytes
        seen.add(storage)
        out[name] = tensor.clone(memory_format=torch.contiguous_format) if shared or not tensor.is_contiguous() else tensor
    return out


def _verify(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Read the written file back: the same names, dtypes, shapes and bits as what was loaded."""
    with safe_open(str(path), framework="pt") as f:
        if set(f.keys()) != set(state):
            raise GroupEmotionError("convert_failed", f"{path}: tensor names differ after writing")
        for name, original in state.items():
            written = f.get_tensor(name)
            if (written.dtype != original.dtype or written.shape != original.shape
                    or not torch.equal(_bits(written), _bits(original))):
                raise GroupEmotionError("convert_failed", f"{path}: tensor {name} differs after writing")


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _read_json(path: Path) -> bytes:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise GroupEmotionError("bad_weights", f"{path} is larger than {MAX_JSON_BYTES} bytes")
    text = path.read_bytes()
    try:
        json.loads(text)
    except ValueError as e:
        raise GroupEmotionError("bad_weights", f"{path} is not JSON: {e}") from None
    return text


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

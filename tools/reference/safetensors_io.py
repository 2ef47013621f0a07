"""Minimal safetensors reader/writer (numpy only).

Format (https://github.com/huggingface/safetensors):
  8 bytes   little-endian u64 N = length of the JSON header
  N bytes   UTF-8 JSON: {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...],
            "data_offsets": [begin, end]}, ...}; offsets are relative to the end of the header.
            The Rust/Python writers pad the header with spaces to a multiple of 8 bytes.
  rest      raw little-endian tensor data, row-major.

BF16 has no numpy dtype: it is read as uint16 and widened to float32 by shifting into the high
half of a uint32 (exact).  Writing BF16 from float data rounds to nearest, ties to even.

Sharded checkpoints use `model.safetensors.index.json`:
  {"metadata": {"total_size": bytes}, "weight_map": {tensor_name: shard_file_name}}
"""

import json
import os
import struct

import numpy as np

_NP_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def bf16_bits_to_f32(bits):
    """uint16 array of bfloat16 bit patterns -> float32 array (exact)."""
    bits = np.asarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x):
    """float array -> uint16 bfloat16 bit patterns, round to nearest even (NaN stays NaN)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def round_to_dtype(x, dtype):
    """Round float data to what `dtype` ("F32", "F16", "BF16") can store, returned as float32."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "F32":
        return x.copy()
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        return bf16_bits_to_f32(f32_to_bf16_bits(x))
    raise ValueError("unsupported dtype %r" % dtype)


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    return header, 8 + n


class RawTensor:
    """A tensor as stored: dtype string, shape, and the numpy view of its bytes."""

    def __init__(self, dtype, shape, array):
        self.dtype = dtype
        self.shape = tuple(shape)
        self.array = array  # numpy array with _NP_DTYPES[dtype] (uint16 bits for BF16)

    def to_float(self, np_dtype=np.float64):
        if self.dtype == "BF16":
            return bf16_bits_to_f32(self.array).astype(np_dtype)
        return self.array.astype(np_dtype)


def load_file_raw(path):
    """Returns ({name: RawTensor}, metadata dict)."""
    header, data_start = read_header(path)
    with open(path, "rb") as f:
        f.seek(data_start)
        data = f.read()
    metadata = header.pop("__metadata__", {}) or {}
    out = {}
    for name, info in header.items():
        dtype = info["dtype"]
        if dtype not in _NP_DTYPES:
            raise ValueError("%s: unsupported dtype %s" % (name, dtype))
        shape = info["shape"]
        begin, end = info["data_offsets"]
        npdt = _NP_DTYPES[dtype]
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * npdt.itemsize:
            raise ValueError("%s: data_offsets %r do not match shape %r dtype %s"
                             % (name, info["data_offsets"], shape, dtype))
        if end > len(data):
            raise ValueError("%s: data past end of file" % name)
        arr = np.frombuffer(data, dtype=npdt, count=count, offset=begin).reshape(shape)
        out[name] = RawTensor(dtype, shape, arr)
    return out, metadata


def load_file(path, np_dtype=np.float64):
    """Loads every tensor of one .safetensors file, floats converted to np_dtype."""
    raw, _ = load_file_raw(path)
    return {k: (v.to_float(np_dtype) if v.dtype in ("F32", "F16", "BF16", "F64") else v.array.copy())
            for k, v in raw.items()}


def load_model_dir_raw(model_dir):
    """Loads all tensors of a HF model directory (single file or sharded with an index)."""
    index_path = os.path.join(model_dir, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        out = {}
        for shard in sorted(set(weight_map.values())):
            tensors, _ = load_file_raw(os.path.join(model_dir, shard))
            for name, t in tensors.items():
                if weight_map.get(name) != shard:
                    raise ValueError("tensor %s found in %s but index says %s"
                                     % (name, shard, weight_map.get(name)))
                out[name] = t
        missing = set(weight_map) - set(out)
        if missing:
            raise ValueError("tensors in index but not in shards: %s" % sorted(missing))
        return out
    tensors, _ = load_file_raw(os.path.join(model_dir, SINGLE_NAME))
    return tensors


def load_model_dir(model_dir, np_dtype=np.float64):
    return {k: v.to_float(np_dtype) for k, v in load_model_dir_raw(model_dir).items()}


def _encode(array, dtype):
    """numpy array -> (bytes, shape) stored as `dtype`."""
    a = np.asarray(array)
    if dtype == "BF16":
        if a.dtype == np.uint16:
            bits = a
        else:
            bits = f32_to_bf16_bits(a)
        return np.ascontiguousarray(bits, dtype="<u2").tobytes(), list(a.shape)
    npdt = _NP_DTYPES[dtype]
    return np.ascontiguousarray(a.astype(npdt)).tobytes(), list(a.shape)


def serialize(tensors, metadata=None):
    """tensors: {name: (array, dtype_str)} or {name: RawTensor}. Returns file bytes.

    Tensors are laid out in sorted name order; the header is padded with spaces to a multiple of 8.
    Output is a pure function of the input (deterministic).
    """
    header = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, RawTensor):
            data, shape, dtype = _encode(t.array, t.dtype) + (t.dtype,)
        else:
            array, dtype = t
            data, shape = _encode(array, dtype)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    return struct.pack("<Q", len(hjson)) + hjson + b"".join(chunks)


def save_file(tensors, path, metadata=None):
    data = serialize(tensors, metadata)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def save_model_dir(tensors, model_dir, num_shards=1, metadata=None):
    """Writes model.safetensors, or num_shards files model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json (tensors split in sorted-name order into roughly equal byte sizes).
    Returns the list of file names written."""
    if metadata is None:
        metadata = {"format": "pt"}
    os.makedirs(model_dir, exist_ok=True)
    if num_shards <= 1:
        save_file(tensors, os.path.join(model_dir, SINGLE_NAME), metadata)
        return [SINGLE_NAME]
    names = sorted(tensors)
    sizes = []
    for n in names:
        t = tensors[n]
        if isinstance(t, RawTensor):
            sizes.append(t.array.size * _NP_DTYPES[t.dtype].itemsize)
        else:
            arr, dt = t
            sizes.append(np.asarray(arr).size * _NP_DTYPES[dt].itemsize)
    total = sum(sizes)
    shards = [[] for _ in range(num_shards)]
    acc = 0
    for n, s in zip(names, sizes):
        idx = min(num_shards - 1, int(acc * num_shards // max(total, 1)))
        shards[idx].append(n)
        acc += s
    files = []
    weight_map = {}
    for i, shard_names in enumerate(shards):
        fname = "model-%05d-of-%05d.safetensors" % (i + 1, num_shards)
        save_file({n: tensors[n] for n in shard_names}, os.path.join(model_dir, fname), metadata)
        files.append(fname)
        for n in shard_names:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(model_dir, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    files.append(INDEX_NAME)
    return files

"""Memory-mapped token datasets in Megatron's MMIDIDX format (``<prefix>.bin`` + ``<prefix>.idx``).

Index file layout (all little-endian)::

    magic            9 bytes   b"MMIDIDX\\x00\\x00"
    version          u64       1
    dtype code       u8        {1:u8, 2:i8, 3:i16, 4:i32, 5:i64, 6:f64, 7:f32, 8:u16}
    sequence count   u64       S
    document count   u64       D (= documents + 1)
    lengths          int32[S]  tokens per sequence
    pointers         int64[S]  byte offset of each sequence in the .bin file
    doc indices      int64[D]  0, then the sequence count after each document

The ``.bin`` file is the concatenation of all sequences in the index dtype.
"""

from __future__ import annotations

import array
import os
import shutil
import struct
from collections.abc import Sequence

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


class DatasetError(ValueError):
    """A dataset file is missing, truncated, corrupt or does not fit the run; the message names it."""


def optimal_dtype(vocab_size: int) -> type:
    """Token dtype Megatron uses for a vocabulary: uint16 below 65,500 entries, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dtype_code(dtype) -> int:
    """MMIDIDX code of a numpy dtype; raises ValueError for dtypes the format cannot hold."""
    dt = np.dtype(dtype)
    if dt not in _CODE_OF:
        raise ValueError(f"dtype {dt} is not storable in MMIDIDX (allowed: {sorted(map(str, _CODE_OF))})")
    return _CODE_OF[dt]


def data_file_path(prefix: str) -> str:
    """Path of the token (.bin) file of a dataset prefix."""
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    """Path of the index (.idx) file of a dataset prefix."""
    return prefix + ".idx"


def dataset_exists(prefix: str) -> bool:
    """True when both the .bin and .idx files of ``prefix`` exist."""
    return os.path.isfile(data_file_path(prefix)) and os.path.isfile(index_file_path(prefix))


def encode_index(dtype, lengths: np.ndarray, document_indices: np.ndarray) -> bytes:
    """Serialise an index: the exact bytes of a ``.idx`` file.

    Args:
        dtype: token dtype of the matching .bin file.
        lengths: int32 [S] tokens per sequence.
        document_indices: int64 [D] document boundaries in sequence units (starts with 0).
    """
    lengths = np.ascontiguousarray(lengths, dtype="<i4")
    docs = np.ascontiguousarray(document_indices, dtype="<i8")
    pointers = np.zeros(len(lengths), dtype="<i8")  # [S] byte offsets
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", dtype_code(dtype))
    header += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(docs))
    return header + lengths.tobytes() + pointers.tobytes() + docs.tobytes()


class IndexedDataset:
    """Read-only memory-mapped view of an MMIDIDX dataset.

    ``ds[i]`` is sequence ``i`` as a read-only numpy array (a view into the mmap);
    ``ds[a:b]`` is a list of such arrays.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._idx_path = index_file_path(prefix)
        self._bin_path = data_file_path(prefix)
        for path in (self._idx_path, self._bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset file not found: {path}")
        self._read_index()
        self._map_data()

    def _read_index(self) -> None:
        path = self._idx_path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < len(MAGIC) or header[: len(MAGIC)] != MAGIC:
            raise DatasetError(
                f"{path}: bad magic {header[: len(MAGIC)]!r}, expected {MAGIC!r} (not an MMIDIDX index)"
            )
        if len(header) < HEADER_SIZE:
            raise DatasetError(f"{path}: truncated index header ({size} bytes, need {HEADER_SIZE})")
        (version,) = struct.unpack_from("<Q", header, 9)
        if version != VERSION:
            raise DatasetError(f"{path}: unsupported index version {version}, expected {VERSION}")
        (code,) = struct.unpack_from("<B", header, 17)
        if code not in DTYPE_CODES:
            raise DatasetError(f"{path}: unknown dtype code {code} (valid: {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n_seq, n_doc = struct.unpack_from("<QQ", header, 18)
        need = HEADER_SIZE + 12 * n_seq + 8 * n_doc
        if size < need:
            raise DatasetError(f"{path}: truncated index ({size} bytes, header promises {need})")
        mm = np.memmap(path, mode="r", dtype=np.uint8, shape=(size,)) if size else np.zeros(0, np.uint8)
        buf = memoryview(mm)
        self._idx_mmap = mm
        self.sequence_lengths = np.frombuffer(buf, "<i4", n_seq, HEADER_SIZE)  # [S]
        self.sequence_pointers = np.frombuffer(buf, "<i8", n_seq, HEADER_SIZE + 4 * n_seq)  # [S]
        self.document_indices = np.frombuffer(buf, "<i8", n_doc, HEADER_SIZE + 12 * n_seq)  # [D]
        if n_doc == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            raise DatasetError(f"{path}: corrupt document indices (must run from 0 to {n_seq})")
        self._check_lengths()

    def _check_lengths(self, block: int = 1 << 20) -> None:
        """Lengths must be non-negative and agree with the byte pointers (a flipped length would
        otherwise read the wrong tokens or fail deep inside sample building)."""
        lengths, pointers, size = self.sequence_lengths, self.sequence_pointers, self.dtype.itemsize
        for start in range(0, len(lengths), block):  # blocks: O(block) scratch for any index size
            end = min(start + block + 1, len(lengths))
            ln, ptr = lengths[start:end].astype(np.int64), pointers[start:end]  # [n]
            bad = np.flatnonzero((ln < 0) | np.append(np.diff(ptr) != ln[:-1] * size, False))
            if start == 0 and len(ptr) and ptr[0] != 0:
                bad = np.insert(bad, 0, 0)
            if len(bad):
                i = start + int(bad[0])
                raise DatasetError(
                    f"{self._idx_path}: corrupt index: sequence {i} has length {int(lengths[i])} and "
                    f"byte pointer {int(pointers[i])}, which disagree with the next pointer"
                )

    def _map_data(self) -> None:
        size = os.path.getsize(self._bin_path)
        n = len(self.sequence_lengths)
        need = 0
        if n:
            need = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        if size < need:
            raise DatasetError(f"{self._bin_path}: truncated data file ({size} bytes, index needs {need})")
        self._bin_mmap = (
            np.memmap(self._bin_path, mode="r", dtype=np.uint8) if size else np.zeros(0, np.uint8)
        )
        self._bin_buffer = memoryview(self._bin_mmap)

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}  # memory maps are reopened, never pickled

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        idx = int(idx)
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence index {idx} out of range for {self.prefix} ({len(self)} sequences)")
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when length is None)."""
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"slice [{offset}, {offset + length}) outside sequence {idx} of length {seq_len}"
            )
        ptr = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_buffer, self.dtype, length, ptr)

    @property
    def num_tokens(self) -> int:
        """Total tokens in the dataset."""
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, sequences={len(self)}, dtype={self.dtype})"


class IndexedDatasetBuilder:
    """Writes an MMIDIDX dataset; files appear under their final names only at ``finalize()``.

    Args:
        prefix_or_paths: dataset prefix, or a ``(bin_path, idx_path)`` pair.
        dtype: token dtype (see ``optimal_dtype``).

    Used as a context manager, an exception removes the temporary files and a clean exit
    finalizes.
    """

    def __init__(self, prefix_or_paths: str | Sequence[str], dtype=np.int32):
        if isinstance(prefix_or_paths, str):
            self.bin_path = data_file_path(prefix_or_paths)
            self.idx_path = index_file_path(prefix_or_paths)
        else:
            self.bin_path, self.idx_path = prefix_or_paths
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        tag = f".tmp-{os.getpid()}"
        self._tmp_bin, self._tmp_idx = self.bin_path + tag, self.idx_path + tag
        self._bin = open(self._tmp_bin, "wb")  # noqa: SIM115 - closed in finalize/abort
        self._lengths = array.array("i")
        self._doc_indices = array.array("q", [0])
        self._done = False
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._range = (info.min, info.max) if info is not None else None

    def _check_range(self, arr: np.ndarray) -> None:
        if self._range is None or arr.size == 0:
            return
        lo, hi = int(arr.min()), int(arr.max())
        if lo < self._range[0] or hi > self._range[1]:
            bad = lo if lo < self._range[0] else hi
            raise ValueError(f"{self.bin_path}: token value {bad} does not fit dtype {self.dtype}")

    def add_item(self, tokens) -> None:
        """Append one sequence without closing the current document."""
        src = np.asarray(tokens)
        self._check_range(src)
        arr = np.ascontiguousarray(src, dtype=self.dtype)
        self._bin.write(arr.tobytes())
        self._lengths.append(int(arr.size))

    def end_document(self) -> None:
        """Close the current document (its sequences are those added since the previous one)."""
        self._doc_indices.append(len(self._lengths))

    def add_document(self, tokens, lengths: Sequence[int] | None = None) -> None:
        """Append one document; ``lengths`` splits ``tokens`` into several sequences."""
        if lengths is None:
            self.add_item(tokens)
        else:
            arr = np.asarray(tokens)
            if sum(lengths) != arr.size:
                raise ValueError(f"lengths sum to {sum(lengths)} but the document has {arr.size} tokens")
            start = 0
            for n in lengths:
                self.add_item(arr[start : start + n])
                start += n
        self.end_document()

    def add_index(self, other_prefix: str) -> None:
        """Append every sequence and document of the dataset at ``other_prefix`` (merging)."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{other_prefix}: dtype {other.dtype} differs from the builder's {self.dtype}")
        base = len(self._lengths)
        self._lengths.frombytes(other.sequence_lengths.astype(np.int32).tobytes())
        self._doc_indices.frombytes((other.document_indices[1:] + base).astype(np.int64).tobytes())
        del other
        with open(data_file_path(other_prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 << 20)

    @property
    def num_sequences(self) -> int:
        """Sequences added so far."""
        return len(self._lengths)

    def finalize(self) -> None:
        """Write the index and move both files to their final names (.bin first, .idx last)."""
        if self._done:
            return
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if self._lengths else np.zeros(0, np.int32)
        data = encode_index(self.dtype, lengths, np.frombuffer(self._doc_indices, dtype=np.int64))
        with open(self._tmp_idx, "wb") as f:
            f.write(data)
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        self._done = True

    def abort(self) -> None:
        """Drop everything written so far; nothing appears under the final names."""
        if self._done:
            return
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def concatenate_datasets(jobs: Sequence[tuple[Sequence[str], str, object]]) -> None:
    """Write each ``(input prefixes, output prefix, dtype)`` job as the inputs' concatenation.

    All or nothing: every output is finalised only after all were assembled; on any error the
    temporary files of every job are removed.
    """
    builders = []
    try:
        for prefixes, out, dtype in jobs:
            builder = IndexedDatasetBuilder(out, dtype)
            builders.append(builder)
            for prefix in prefixes:
                builder.add_index(prefix)
        for builder in builders:
            builder.finalize()
    except BaseException:
        for builder in builders:
            builder.abort()
        raise

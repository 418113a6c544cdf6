"""Reading sharded checkpoints of the earlier format (llmlab-dcp-1: DCP's FileSystemWriter, whose
`.metadata` file is a pickle and whose shards are `__R_I.distcp` files), without running any code.

Two doors a planted file could use, both shut here:
  * the `.metadata` pickle names globals. The unpickler resolves a global only if its (module,
    name) pair is one of an exact list of DCP's metadata classes and torch's size/dtype types. A
    dotted name (`os.system` "inside" an allowed module, which pickle's protocol 4 would walk to)
    or any other pair is refused before anything is called;
  * DCP's load planner hands byte entries (`BytesStorageMetadata`) to torch.load(weights_only=
    False). The metadata is checked before DCP sees it: every entry must be a tensor of this
    model's keys, stored in a regular `__R_I.distcp` file of this checkpoint's folder at a
    non-negative offset, with no transforms; `read_data` refuses byte items as a second guard.
Tensor entries are read by DCP with torch.load(weights_only=True), torch's tensors-only loader.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType

from llmlab.errors import LlmlabError, one_line

_DCP_META = "torch.distributed.checkpoint.metadata"
_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
# Exactly what llmlab's own sharded checkpoints of this format reference (checked on real files):
ALLOWED = {(_DCP_META, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                         "TensorStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")}
ALLOWED |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
            ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
            ("collections", "OrderedDict")}
ALLOWED |= {("torch", dtype) for dtype in _DTYPES}
SHARD_FILE = re.compile(r"__\d+_\d+\.distcp")


class _ExactUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return super().find_class(module, name)


def read_metadata_pickle(path: Path):
    try:
        return _ExactUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # noqa: BLE001 - whatever a damaged or hostile pickle raises: one line
        raise LlmlabError(f"sharded checkpoint {path.parent} has unreadable metadata ({one_line(e)[:200]}); "
                          "restore it or retrain") from None


class LegacyReader(FileSystemReader):
    """FileSystemReader over a checked `.metadata` (see the module docstring)."""

    def __init__(self, path: str, allowed_keys: set[str]):
        super().__init__(path)
        self.allowed_keys = allowed_keys

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (Metadata, MetadataIndex, StorageMeta,
                                                           TensorStorageMetadata)

        folder = Path(self.path)
        metadata = read_metadata_pickle(folder / ".metadata")

        def bad(why: str) -> LlmlabError:
            return LlmlabError(f"sharded checkpoint {folder} has invalid metadata ({why}); restore it or retrain")

        if type(metadata) is not Metadata or not isinstance(metadata.state_dict_metadata, dict) \
                or not isinstance(metadata.storage_data, dict):
            raise bad("not DCP metadata")
        for key, entry in metadata.state_dict_metadata.items():
            if type(entry) is not TensorStorageMetadata:
                raise bad(f"{key!r} is not a tensor entry")
            if key not in self.allowed_keys:
                raise bad(f"{key!r} is not a tensor of this model")
        for index, info in metadata.storage_data.items():
            if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
                raise bad("a storage entry of another type")
            name = info.relative_path
            if not (isinstance(name, str) and SHARD_FILE.fullmatch(name)):
                raise bad(f"a storage entry points at {name!r}, not a shard file of this checkpoint")
            shard = folder / name
            if shard.is_symlink() or not shard.is_file():
                raise bad(f"shard {name} is missing or not a regular file")
            if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                    and info.length >= 0) or info.transform_descriptors:
                raise bad(f"a storage entry of {name} has an invalid offset, length or transforms")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        if any(item.type == LoadItemType.BYTE_IO for item in plan.items):  # never after read_metadata
            raise LlmlabError(f"sharded checkpoint {self.path} asks to unpickle a value; refused")
        return super().read_data(plan, planner)

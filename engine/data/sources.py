"""Where a Loader's records come from: a packed split (LMDB shards) or a raw ImageNet folder.

Both give the same record for index i: (image, label, path, (width, height) or None when the
size is not recorded), so decoding and transforms never know which one they read. The image is
encoded bytes, or, for a raw record of a version-2 pack, its uint8 HxWx3 BGR pixels, which the
transforms crop without decoding.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple, Union

import numpy as np

from engine.data import shards
from engine.data.folder import FolderIndex, index_folder, read_file
from engine.errors import ConfigError, DataError, MissingPathError, read_error_message

__all__ = ["Record", "Source", "ShardSource", "FolderSource", "open_source"]

# (image bytes or raw pixels, label, path for messages, (width, height) when the packer
# recorded it)
Record = Tuple[Union[bytes, np.ndarray], int, str, Optional[Tuple[int, int]]]


class ShardSource:
    """Records of a packed split."""

    def __init__(self, split_dir: str):
        self.split = shards.Split(split_dir)
        self.classes: List[str] = list(self.split.classes)
        self.root = self.split.root

    def __len__(self) -> int:
        return len(self.split)

    def read(self, i: int) -> Record:
        rec = self.split.get(i)
        # The packer guarantees a 3-channel JPEG (or raw pixels) whose size is recorded: no
        # header probe needed.
        return shards.record_image(rec), rec["label"], rec["path"], (rec["width"], rec["height"])

    def files_of(self, indices) -> List[str]:
        """Sorted shard file names holding these records (to name them in an error)."""
        return sorted({os.path.basename(self.split.files[self.split.locate(int(i))[0]])
                       for i in indices})


class FolderSource:
    """Files of a raw <split>/<wnid>/* folder (same decode and transforms as shards)."""

    def __init__(self, index: FolderIndex):
        self.root = index.root
        self.classes: List[str] = list(index.classes)
        self.items = index.items

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> Record:
        rel, label = self.items[i]
        path = os.path.join(self.root, rel)
        try:
            return read_file(path), label, rel, None
        except OSError as exc:  # unreadable, not undecodable: the user's to fix, not to skip
            raise DataError(read_error_message(exc, path)) from None

    def files_of(self, indices) -> List[str]:
        """Nothing to add to an error: the record's path already names its file."""
        return []


Source = Union[ShardSource, FolderSource]


def open_source(source: Union[str, FolderIndex]) -> Source:
    """A packed split folder (with meta.json), a raw folder, or a FolderIndex of one."""
    if isinstance(source, FolderIndex):
        return FolderSource(source)
    if os.path.isfile(source):
        raise ConfigError(
            "%s is a file; pass a packed split folder (with meta.json) or a raw "
            "<split>/<wnid>/*.JPEG folder" % source)
    if not os.path.isdir(source):
        raise MissingPathError(
            "%s does not exist. Pass a packed split folder (with meta.json, made by "
            "tools/pack_imagenet.py) or a raw <split>/<wnid>/*.JPEG folder." % source)
    if shards.is_packed(source):
        return ShardSource(source)  # read_meta explains an incomplete or unknown split
    return FolderSource(index_folder(source))

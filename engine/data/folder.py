"""The raw ImageNet layout: <split>/<wnid>/<file>, labels = sorted class folders of train."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from engine.errors import UserError

__all__ = ["LayoutError", "FolderIndex", "index_folder", "list_classes", "scan_split", "read_file",
           "classes_for"]


class LayoutError(UserError, ValueError):
    """The folder is not in the ImageNet layout; the message says what to change."""


def _visible(name: str) -> bool:
    return not name.startswith(".")


def list_classes(split_dir: str) -> List[str]:
    """Sorted visible sub-folder names: the class list (label i is classes[i])."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and _visible(e.name))


def classes_for(split_dir: str) -> List[str]:
    """Classes of a split: those of the sibling train/ folder when it exists (so val labels
    match train's even if val lacks a class), else the split's own folders."""
    train = os.path.join(os.path.dirname(os.path.abspath(split_dir)), "train")
    return list_classes(train if os.path.isdir(train) else split_dir)


def scan_split(split_dir: str, classes: Optional[Sequence[str]] = None) -> List[Tuple[str, int]]:
    """Sorted (path relative to split_dir, label) of every visible file under <class>/ folders.

    Hidden files and folders are ignored; any file name or extension is accepted (the content
    decides what an image is). Raises LayoutError for a missing folder, files lying loose
    without class folders, or a class folder that the class list lacks.
    """
    if not os.path.isdir(split_dir):
        raise LayoutError("%s does not exist; expected an ImageNet layout ROOT/train/<wnid>/*.JPEG,"
                          " ROOT/val/<wnid>/*.JPEG" % split_dir)
    present = list_classes(split_dir)
    classes = list(present if classes is None else classes)
    if not present:
        loose = sorted(e.name for e in os.scandir(split_dir) if e.is_file() and _visible(e.name))
        if loose:
            raise LayoutError(
                "%s holds %d files directly (e.g. %s) but no class folders. Sort them into "
                "<wnid>/ folders first (for ImageNet val, the usual valprep.sh script does it)."
                % (split_dir, len(loose), loose[0]))
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise LayoutError(
            "%s has class folder(s) that train lacks: %s. Every class must appear in train "
            "(labels are the sorted train folders); remove them or add them to train."
            % (split_dir, ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")))
    label_of = {c: i for i, c in enumerate(classes)}
    items: List[Tuple[str, int]] = []
    for cls in present:
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, cls), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            # once per folder, not per file: relpath costs ~25 us, 30 s of ImageNet's scan
            rel_dir = os.path.relpath(dirpath, split_dir)
            label = label_of[cls]
            items.extend((os.path.join(rel_dir, name), label)
                         for name in filenames if _visible(name))
    items.sort()
    return items


@dataclass(frozen=True)
class FolderIndex:
    """A raw split's file list, scanned once. Pass it to Loader as `source` in place of the
    folder's path, so that N ranks of a node share one scan of a tree of a million files (the
    trainer scans in the parent; forked ranks inherit the list)."""

    root: str
    classes: Tuple[str, ...]
    items: Tuple[Tuple[str, int], ...]


def index_folder(split_dir: str) -> FolderIndex:
    """Scan a raw <split>/<wnid>/* folder (labels from the sibling train/ when it exists)."""
    root = os.path.abspath(split_dir)
    classes = classes_for(root)
    items = scan_split(root, classes)
    if not items:
        raise LayoutError("%s has no files under class folders" % root)
    return FolderIndex(root, tuple(classes), tuple(items))


def read_file(path: str) -> bytes:
    """A file's bytes, as the packer and a raw-folder Loader read them: one read sized from
    fstat, where open().read() adds a buffered reader, an lseek, a second fstat and a second
    read to find the end (~7 us of ~40 per file). OSError as open() would raise it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)  # one byte more, so that the usual case needs one read
        if len(data) == size:
            return data
        parts = [data]  # it changed size since fstat, or the read came back short: read on
        while True:
            more = os.read(fd, max(size, 1 << 16))
            if not more:
                return b"".join(parts)
            parts.append(more)
    finally:
        os.close(fd)

"""The shard checksum: "blake2b:<hex>" of a shard file's bytes (`file_checksum`), what meta.json
and the markers record and verify_pack, stage_shards and the packer's reruns compare.

BLAKE2b-512 (unkeyed, the digest of hashlib.blake2b()) of a stream of buffers (`Blake2b`),
computed by libsodium where the shared library is installed, else by hashlib.

The same algorithm and the same digest either way; the difference is speed. CPython's
BLAKE2b is portable C (about 460-560 MB/s on the packer's test machine), libsodium picks a
vectorised one for the CPU at run time (AVX2 there: about 1.5x as fast). Shard checksums hash
every byte a pack writes, about a tenth of a packing worker's time per image with hashlib.

Standard library only (ctypes), so engine.data may use it anywhere.
"""
from __future__ import annotations

import ctypes
import hashlib
from typing import Any, Optional, Union

__all__ = ["CHECKSUM_ALGO", "file_checksum", "Blake2b", "sodium_available"]

# Shard checksums are "blake2b:<hex>", and engines compare the whole string, so the algorithm
# stays (sha256 would be faster on CPUs with SHA extensions, but an older engine would call every
# new shard damaged).
CHECKSUM_ALGO = "blake2b"
# file_checksum reads into one buffer of this size per call: a fresh 4 MB bytes object per
# chunk made a packing worker fault in ~8 MB of heap for every
# shard it hashed, ~2,000 page faults; a reused 1 MB buffer touches 256 pages, stays in L2
# cache for the hash, and is still large enough for network file systems.
_CHUNK = 1 << 20

# Tried by name only: ctypes.util.find_library would run `ldconfig -p` in a subprocess in every
# process that looks (every packing worker).
_SONAMES = ("libsodium.so.23", "libsodium.so.26", "libsodium.so", "libsodium.dylib")
_DIGEST = 64  # bytes: BLAKE2b-512, hashlib.blake2b()'s default
_ALIGN = 64  # crypto_generichash_blake2b_state is declared 64-byte aligned

_lib: Any = None  # None: not looked up yet; False: absent


def _sodium() -> Any:
    """The loaded libsodium with the BLAKE2b functions typed, or False where it is absent;
    looked up once (a forked child inherits the answer and the loaded library)."""
    global _lib
    if _lib is not None:
        return _lib
    _lib = False
    for name in _SONAMES:
        try:
            lib = ctypes.CDLL(name)
            init, update, final = (lib.crypto_generichash_blake2b_init,
                                   lib.crypto_generichash_blake2b_update,
                                   lib.crypto_generichash_blake2b_final)
            if lib.sodium_init() < 0:
                continue
        except (OSError, AttributeError):
            continue
        init.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong]
        final.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        init.restype = update.restype = final.restype = ctypes.c_int
        lib.crypto_generichash_blake2b_statebytes.restype = ctypes.c_size_t
        _lib = lib
        break
    return _lib


def sodium_available() -> bool:
    """Whether Blake2b() hashes through libsodium in this process."""
    return bool(_sodium())


class Blake2b:
    """hashlib.blake2b()'s update/hexdigest over buffers, through libsodium when it is there
    (or when `sodium` is True: then it must be; False: hashlib regardless)."""

    def __init__(self, sodium: Optional[bool] = None):
        lib: Any = _sodium() if sodium is not False else False
        if sodium and not lib:
            raise RuntimeError("libsodium is not available")
        self._lib = lib
        self._h: Any = None
        if not lib:
            self._h = hashlib.blake2b()
            return
        size = lib.crypto_generichash_blake2b_statebytes()
        self._state_buf = ctypes.create_string_buffer(size + _ALIGN)
        self._state = ctypes.addressof(self._state_buf) + (-ctypes.addressof(self._state_buf)
                                                            % _ALIGN)
        if lib.crypto_generichash_blake2b_init(self._state, None, 0, _DIGEST) != 0:
            raise RuntimeError("crypto_generichash_blake2b_init failed")

    def update(self, data: Union[bytes, bytearray, memoryview]) -> None:
        if self._h is not None:
            self._h.update(data)
            return
        if isinstance(data, bytes):  # ctypes passes a bytes object's own buffer
            self._lib.crypto_generichash_blake2b_update(self._state, data, len(data))
            return
        view = memoryview(data).cast("B")
        if view.nbytes:
            buf = view if not view.readonly else bytearray(view)  # from_buffer needs writable
            self._lib.crypto_generichash_blake2b_update(
                self._state, (ctypes.c_char * view.nbytes).from_buffer(buf), view.nbytes)

    def hexdigest(self) -> str:
        """The digest in hex; call it once (libsodium's final consumes the state)."""
        if self._h is not None:
            return self._h.hexdigest()
        out = ctypes.create_string_buffer(_DIGEST)
        if self._lib.crypto_generichash_blake2b_final(self._state, out, _DIGEST) != 0:
            raise RuntimeError("crypto_generichash_blake2b_final failed")
        return out.raw.hex()


def file_checksum(path: str, progress=None) -> str:
    """"blake2b:<hex>" of a file's bytes; progress(n) is called after each chunk read."""
    h = Blake2b()  # libsodium's vectorised BLAKE2b where installed: the same digest, ~1.5x faster
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if progress is not None:
                progress(n)
    return "%s:%s" % (CHECKSUM_ALGO, h.hexdigest())

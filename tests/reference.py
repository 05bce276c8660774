"""Plain numpy re-statements of jaxrec's documented hashes, shared by the tests as independent
references (nothing here imports jaxrec)."""

import zlib

import numpy as np


def fmix32(h):
  """murmur3's 32-bit finaliser on uint32 values."""
  h = np.asarray(h).astype(np.uint32)
  h ^= h >> np.uint32(16)
  h *= np.uint32(0x85EBCA6B)
  h ^= h >> np.uint32(13)
  h *= np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def hash_pair(ids: np.ndarray, salt) -> np.ndarray:
  """fmix32(lo ^ fmix32(hi ^ salt)) of uint64 IDs."""
  ids = np.asarray(ids, np.uint64)
  lo = (ids & np.uint64(0xFFFFFFFF)).astype(np.uint32)
  hi = (ids >> np.uint64(32)).astype(np.uint32)
  return fmix32(lo ^ fmix32(hi ^ np.uint32(salt)))


def table_salt(name: str) -> np.uint32:
  return np.uint32((zlib.crc32(name.encode()) * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF)


def hashed_rows(ids: np.ndarray, table: str, rows: int) -> np.ndarray:
  """The row of each ID in a hashed table of ``rows`` rows."""
  return (hash_pair(ids, table_salt(table)) % np.uint32(rows)).astype(np.int64)

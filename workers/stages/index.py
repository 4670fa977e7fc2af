"""Stage 5, index: chunks and vectors into Postgres/pgvector in one transaction.

The caller opens the transaction (so it can fence it with the job's lease and
cancellation flag and record completion in it); :func:`write_chunks` deletes
the document's previous chunks and binary-COPYs the new ones, so a retried
index is idempotent and readers see either the old set or the new one.
Vectors travel in pgvector's binary format through a codec registered on the
connection (:func:`register_vector_codec`).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import numpy as np
from asyncpg.pool import PoolConnectionProxy

from app.core.embedding import Vectors
from workers.stages.common import Chunk

CHUNK_COLUMNS = (
    "document_id",
    "seq",
    "owner_id",
    "text",
    "token_count",
    "page_start",
    "page_end",
    "char_start",
    "char_end",
    "sha256",
    "embedding",
)
_HEADER = struct.Struct(">HH")


def encode_vector(value: Any) -> bytes:
    """pgvector binary send format: dim (int16), unused (int16), float32 BE values."""
    arr = np.asarray(value, dtype=">f4").reshape(-1)
    return _HEADER.pack(arr.shape[0], 0) + arr.tobytes()


def decode_vector(data: bytes) -> list[float]:
    dim, _ = _HEADER.unpack_from(data)
    values: list[float] = np.frombuffer(data, dtype=">f4", count=dim, offset=_HEADER.size).tolist()
    return values


async def register_vector_codec(conn: asyncpg.Connection | PoolConnectionProxy) -> None:
    """Binary codec for pgvector's ``vector`` type on ``conn`` (idempotent)."""
    schema = await conn.fetchval(
        "SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE t.typname = 'vector'"
    )
    await conn.set_type_codec(
        "vector",
        schema=schema or "public",
        encoder=encode_vector,
        decoder=decode_vector,
        format="binary",
    )


def _records(
    document_id: uuid.UUID, owner_id: str, chunks: list[Chunk], vectors: Vectors
) -> Iterator[tuple[Any, ...]]:
    for chunk, vec in zip(chunks, vectors, strict=True):
        yield (
            document_id,
            chunk.seq,
            owner_id,
            chunk.text,
            chunk.token_count,
            chunk.page_start,
            chunk.page_end,
            chunk.char_start,
            chunk.char_end,
            chunk.sha256,
            vec,
        )


async def write_chunks(
    conn: asyncpg.Connection | PoolConnectionProxy,
    document_id: str,
    owner_id: str,
    chunks: list[Chunk],
    vectors: Vectors,
) -> int:
    """Replace the document's chunks (call inside a transaction); returns rows written."""
    if len(chunks) != len(vectors):
        raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
    await register_vector_codec(conn)
    doc_uuid = uuid.UUID(document_id)
    await conn.execute("DELETE FROM chunks WHERE document_id = $1", doc_uuid)
    if not chunks:
        return 0
    await conn.copy_records_to_table(
        "chunks", records=_records(doc_uuid, owner_id, chunks, vectors), columns=CHUNK_COLUMNS
    )
    return len(chunks)

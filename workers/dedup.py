"""Deduplication that holds under concurrency: one user's identical documents are indexed once.

Two documents are identical when they have the same owner, the same sha256
(computed by validate) and the same processing options.  Right after validate,
:func:`claim_content` decides, race-free, what this attempt does with its bytes:

* an identical document is already indexed: end ``deduplicated``, pointing at
  it (:attr:`Claim.original`);
* an identical document is being processed by another job (status
  ``running``): wait for it (:attr:`Claim.running_job`; the attempt is handed
  back to the queue without spending an attempt and looks again shortly, then
  ends deduplicated, or processes the document if the other one failed);
* otherwise: this job claims the content and processes it.

The claim is the document's ``sha256`` column written while its job is
``running``.  Deciding and claiming happen in one transaction under a
transaction-scoped advisory lock on (owner, sha256, options), so of two
identical jobs deciding at the same moment exactly one claims and the other
sees that claim.  A claim needs no cleanup: it lapses as soon as its job is no
longer ``running`` -- it completed (then it is an indexed original), failed,
was cancelled or handed back; or its worker died, and the reaper makes the job
``retrying`` once its lease lapses (``workers/lease.py``), so a dead first job
blocks the second for at most about one ``JOB_LEASE_SECONDS``.  A worker that is
alive but cut off from Postgres keeps its claim, as it keeps its lease.

The index step checks once more, in its final transaction and under the same
lock (:func:`indexed_twin`): a job resumed from its checkpoints skips validate
and so the claim, and must not index a second copy of content indexed meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.attempt import Attempt, Conn
from workers.stages.common import DocumentInfo


@dataclass(frozen=True)
class Claim:
    """What :func:`claim_content` decided (at most one field set; none: process it)."""

    original: str | None = None
    """An indexed identical document: end as its duplicate."""
    running_job: str | None = None
    """The job processing an identical document right now: wait for it."""


_LOCK = """
    SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2 || '/' || ($3::jsonb)::text, 12))
"""

_INDEXED = """
    SELECT COALESCE(deduplicated_of, id)::text FROM documents
    WHERE owner_id = $1 AND sha256 = $2 AND status = 'indexed' AND id <> $3::uuid
      AND processing_options = $4::jsonb
    ORDER BY created_at LIMIT 1
"""

_RUNNING = """
    SELECT j.id::text FROM documents d JOIN jobs j ON j.document_id = d.id
    WHERE d.owner_id = $1 AND d.sha256 = $2 AND d.id <> $3::uuid
      AND d.processing_options = $4::jsonb AND j.status = 'running'
    LIMIT 1
"""


async def claim_content(attempt: Attempt, sha256: str) -> Claim:
    """Decide what the attempt does with a document whose bytes hash to ``sha256``
    (see the module docstring); claims the content (writes the document's
    ``sha256``) unless an identical document is indexed or being processed.

    Raises :class:`~workers.lease.LeaseLost` (or ``CancelRequested``) instead of
    claiming for an attempt that no longer holds its job.
    """
    doc = attempt.document
    args = (doc.owner_id, sha256, doc.id, doc.processing_options)
    async with attempt.ctx.db.acquire() as conn, conn.transaction():
        await conn.execute(_LOCK, doc.owner_id, sha256, doc.processing_options)
        original = await conn.fetchval(_INDEXED, *args)
        running = None if original is not None else await conn.fetchval(_RUNNING, *args)
        if running is not None:
            return Claim(running_job=str(running))
        await attempt.verify(conn, lock=False)
        await conn.execute(
            "UPDATE documents SET sha256 = $2, updated_at = now() WHERE id = $1::uuid",
            doc.id,
            sha256,
        )
    return Claim(original=None if original is None else str(original))


async def indexed_twin(conn: Conn, doc: DocumentInfo) -> str | None:
    """Inside the index step's transaction: lock the document's content (until that
    transaction ends) and return an identical document indexed in the meantime, if any."""
    sha256 = await conn.fetchval("SELECT sha256 FROM documents WHERE id = $1::uuid", doc.id)
    if sha256 is None:
        return None
    await conn.execute(_LOCK, doc.owner_id, sha256, doc.processing_options)
    found = await conn.fetchval(_INDEXED, doc.owner_id, sha256, doc.id, doc.processing_options)
    return None if found is None else str(found)

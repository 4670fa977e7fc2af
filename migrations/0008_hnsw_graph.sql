-- A denser HNSW graph for search: ef_construction 200 (pgvector's default is 64), m 16.
--
-- Measured on 100,000 real chunks (bench/search.py, BENCHMARKS.md): recall@10 against
-- an exact scan is 0.94 at ef_search 64 and 0.96 at 100 with the default graph; a
-- graph built with ef_construction 128 to 256 reaches 0.96-0.97 already at ef_search 64,
-- so SEARCH_EF_SEARCH drops from 100 to 64 and each search costs PostgreSQL ~30% less
-- CPU at higher recall.  The price is paid once per row: inserts (the index stage) and
-- builds take ~2x longer (~1-2 ms of CPU per chunk, against ~30 ms to embed it).
--
-- Rebuilding runs in this migration's transaction and blocks writes to chunks while it
-- runs (about a minute per 100,000 chunks on 2 cores with enough maintenance_work_mem;
-- raise maintenance_work_mem above the index's size, ~200 MB per 100,000 chunks, for
-- large tables, or pgvector builds on disk, much slower).
DROP INDEX IF EXISTS chunks_embedding_hnsw;
CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops)
    WITH (m = 16, ef_construction = 200);

-- A denser HNSW graph for search: ef_construction 200 (pgvector's default is 64), m 16.
--
-- Measured on 100,000 real chunks (bench/search.py, BENCHMARKS.md), recall@10 against an
-- exact scan on the same queries: with the default graph 0.94 at ef_search 64 and 0.96 at
-- 100; with this one 0.96 at 64 and 0.98 at 100, for about the same PostgreSQL CPU per
-- search at each ef_search.  SEARCH_EF_SEARCH stays 100: a better answer for the same cost
-- (64 gives the old recall for ~20% less CPU in PostgreSQL).  The price is paid once per
-- row: builds and inserts (the index stage) take ~2x longer (a 100,000-chunk build 71 s
-- against 27-38 s on 2 cores; ~1-2 ms of CPU per chunk, against ~30 ms to embed it).
--
-- Rebuilding runs in this migration's transaction and blocks writes to chunks while it
-- runs.  For large tables raise maintenance_work_mem above the index's size (~200 MB per
-- 100,000 chunks) before migrating, or pgvector builds on disk, much slower.
DROP INDEX IF EXISTS chunks_embedding_hnsw;
CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops)
    WITH (m = 16, ef_construction = 200);

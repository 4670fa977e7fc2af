"""The five pipeline stages, one module each, as plain typed async functions.

Each takes its inputs and collaborators explicitly and reports through a
:class:`~workers.stages.common.StageReporter`, so it runs (and is tested)
without a queue: validate -> extract -> chunk -> embed -> index.
"""

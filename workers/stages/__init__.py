"""The five pipeline stages, one module each, as plain typed functions.

Each takes its inputs and collaborators explicitly and (where it runs long)
reports through a :class:`~workers.stages.common.StageReporter`, so it runs
(and is tested) without a queue: validate -> extract -> chunk -> embed ->
index.  Extraction's formats and budget sit beside it (``pdf.py``,
``formats.py``, ``budget.py``).  ``workers/steps.py`` runs them for a job.
"""

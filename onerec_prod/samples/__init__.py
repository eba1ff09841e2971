"""onerec_prod.samples: training samples of every OneRec-Think stage.

- ``templates`` / ``prompts``: template data and chat rendering (loss on the response only);
- ``builders``: examples + catalog items -> rows of the ``samples`` table, one builder per task,
  and the task registry (``REGISTRY``) both build paths run (docs/SAMPLES.md: add a task);
- ``rationale``: pluggable RA rationale sources (``category``, ``teacher``) over a pruned context;
- ``stream``: the ``sid_stream`` format;
- ``lengths``: token-length estimate and per-task percentiles;
- ``mix``: the daily mix (day D + seeded replay of earlier days), pure and its Spark key;
- ``export``: the one JSONL writer of sample rows and the day's training-mix export (Spark).

Everything but ``export.export_training_mix`` and ``mix.rank_col`` is pure Python.
"""

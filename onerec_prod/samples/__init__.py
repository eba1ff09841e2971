"""onerec_prod.samples: training samples of every OneRec-Think stage (pure functions).

- ``templates`` / ``prompts``: template data and chat rendering (loss on the response only);
- ``builders``: examples + catalog items -> rows of the ``samples`` table, one builder per task;
- ``rationale``: pluggable RA rationale sources (``category``, ``teacher``) over a pruned context;
- ``mix``: the daily mix (day D + seeded replay of earlier days).
"""

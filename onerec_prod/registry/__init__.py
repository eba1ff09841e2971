"""onerec_prod.registry: MLflow tracking, the promotion gate, the model registry and aliases.

Submodules import MLflow only inside functions: ``tracking`` (day/step runs), ``gate`` (pure
gate), ``registry`` (register/promote/rollback/champion/status, model specs -> version and dir),
and the CLIs ``cli_promote``, ``cli_rollback``, ``cli_status`` and ``cli_gate`` (the library side: ``release``) (one module per
``onerec-prod`` subcommand, named ``cli_<subcommand>``).
"""

"""onerec_prod.registry: MLflow tracking, the promotion gate, the model registry and aliases.

Submodules import MLflow only inside functions: ``tracking`` (day/step runs), ``gate`` (pure
gate), ``registry`` (register/promote/rollback/champion/status), and the CLIs ``gate_cli``,
``cli_promote``, ``cli_rollback``, ``cli_status``.
"""

"""Triton Inference Server model repositories for an artifact: the layout and writer (repository.py),
the generated configurations as data (configs.py), their schema (schema.py) and cross-checks
(checks.py), and the python-backend model sources copied into the repository (models/). The command
is ettin_export.commands.deploy."""

"""Prefect orchestration of the DVC pipeline: DVC decides what runs, Prefect schedules,
retries, routes (the train stage to a GPU work pool) and shows.

`python -m pipeline --help` runs it without a server; prefect.yaml deploys it to one
(see docs/orchestration.md).
"""

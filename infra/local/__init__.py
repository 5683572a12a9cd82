"""The local development stack behind ``advflow stack up | down | status | env`` (infra/local/).

A Ray head with token auth, an S3 endpoint (moto) and an MLflow server, all on 127.0.0.1:
``cli`` (the ``advflow`` command), ``stack`` (its logic and state), ``services`` (one service
each) and ``proc`` (detached processes, ports, health waits). See infra/local/README.md.
"""

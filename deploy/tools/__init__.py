"""kvcat's deploy tooling: the Grafana dashboard as code (dashboard.py), the deploy/ files generated from it
and from the Prometheus rules (generate.py), and a PNG preview from a live Prometheus (preview.py).

Not part of the installed `kvcat` package: the server never needs it, and what it writes lives in this
checkout's deploy/. `kvcat dashboard ...` and the tests load this folder by path as one package
(`kvcat.bench.deploy_tools`), so its modules import each other relatively.
"""

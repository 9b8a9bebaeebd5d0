"""The public face of Safe Trigger: an OpenAI-compatible inference gateway with the `<safe>` block as a
structured field, and a jobs API that runs pipelines as Ray Jobs. A FastAPI app, deployed as a Ray Serve ingress
in front of the policy replicas (`deploy.py`), or run alone against any policy endpoint (`app.py`)."""

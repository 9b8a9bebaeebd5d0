"""The gateway's routes by area: inference (OpenAI chat and completions), models, jobs, ops (health, metrics)."""

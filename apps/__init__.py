"""The application: the `safe-trigger` command line, which runs the main job here, serves the policy and the
gateway, and talks to a gateway through `clients.client`. Top layer: it may import every other package."""

"""Configuration: the service's settings, each model's serving.json, and the connection budget."""

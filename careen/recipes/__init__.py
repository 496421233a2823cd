"""Built-in recipes, as YAML files."""

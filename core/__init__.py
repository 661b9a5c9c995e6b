"""The kernel every layer imports: schemas of catalogue entries and settings, user errors, the catalogue, YAML parsing,
prompt templates, project paths and loopback ports. It imports nothing of the project above it."""

"""What Git declares: the source (pygit2), YAML, validation, manifests -> ``AppSpec``, round-trip edits,
the operator's config, and secrets' resolution."""

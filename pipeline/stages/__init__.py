"""One module per DVC stage: read inputs and params, call components, write outputs."""

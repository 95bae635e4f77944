"""The shippable model package: the networks (scratch families and the pretrained-feature
families with their backbones), image decoding with its limits, the table transform, scoring,
and the MLflow pyfunc that serves them.

This package, and nothing else of the repository, is packed into every registered model
(``pipeline.registry.log_detector``'s ``code_paths``) and hashed into its fingerprint
(``pipeline.stages.register.model_fingerprint``), so a model needs no checkout to run and a
change elsewhere (the data generator, a stage, the DAG) never changes a model's identity.

The rule that keeps it shippable: nothing here imports ``components``, ``pipeline`` or
``dags``; heavy libraries are imported where they are used.
"""

"""The model lifecycle after training: the registry, regression gates."""

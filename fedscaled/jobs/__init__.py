"""Jobs: the registry in the store, their logs, and the round engine that drives them."""

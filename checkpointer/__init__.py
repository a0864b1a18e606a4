"""colo-ring checkpointer package (see the issues that build it)."""

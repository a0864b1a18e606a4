"""colo-ring scenarios package (see the issues that build it)."""

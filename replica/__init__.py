"""colo-ring replica package (see the issues that build it)."""

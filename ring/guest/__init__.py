"""Guest programs: the long-mode CPL3 loader, the C runtime, and the builder."""

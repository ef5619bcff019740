"""The `dreamloom` command line: the composition root that wires the studio to its front doors (bot, gallery) and
the engine. Nothing in engine/, storage/ or studio/ imports it."""

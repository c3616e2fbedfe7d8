"""The daemon wing: the resident root agent. Imports the core, never ops."""

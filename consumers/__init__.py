"""Worker processes: one runtime and pluggable model backends."""

"""The lowdose app's tasks: thin wrappers that call the lowdose library."""

"""The build of each target (cpu, tensorrt) and what they share; ettin_export.pipeline runs them."""

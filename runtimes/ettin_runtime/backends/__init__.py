"""The local runtimes, one file each: `from_artifact(artifact, LoadOptions) -> Reranker`, and
`_score(packed batch)`. A new one is a file here plus a line in ettin_runtime.loading.RUNTIMES."""

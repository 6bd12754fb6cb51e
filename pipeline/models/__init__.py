"""Networks of the pipeline."""

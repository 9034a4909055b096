"""workers/pipeline."""

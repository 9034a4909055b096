"""workers/codecs."""

"""Integration tests: dicom."""

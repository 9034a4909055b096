"""workers/dicom."""

"""workers/dicom.

pydicom, when it converts a value that does not fit its VR, warns and logs the value
("Invalid value for VR DA: '…'"): a patient's birth date or name in a log. Strata never
lets it: reading validation is off in every process that imports this package (the
workers and the node). It only ever warned; values are read the same either way, and
Strata checks what it relies on itself (``split``).
"""

from pydicom import config as _pydicom_config

_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE

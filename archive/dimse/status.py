"""Named DIMSE status codes used by the SCP (PS3.4 Annex B.2.3 and PS3.7 Annex C)."""

SUCCESS = 0x0000
# C-STORE failures, PS3.4 B.2.3
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (storage full)
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (malformed dataset, bad UIDs)
PROCESSING_FAILURE = 0xC001  # Error: Cannot understand class, used for our own failures (database, I/O)

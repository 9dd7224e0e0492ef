"""Named DIMSE status codes used by the SCP (PS3.4 Annex B.2.3 and PS3.7 Annex C)."""

SUCCESS = 0x0000
# C-STORE failures, PS3.4 B.2.3
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (storage full)
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (malformed dataset, bad UIDs)
PROCESSING_FAILURE = 0xC001  # Error: Cannot understand class, used for our own failures (database, I/O)

# General (PS3.7 C.4) and Query/Retrieve (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)
PENDING = 0xFF00  # Pending: matches are continuing
CANCEL = 0xFE00  # Cancel: matching terminated due to a C-CANCEL
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Identifier does not match SOP Class
UNABLE_TO_PROCESS = 0xC000  # Failed: Unable to process
MOVE_DESTINATION_UNKNOWN = 0xA801  # Refused: Move Destination unknown
SUB_OPERATIONS_WARNING = 0xB000  # Warning: sub-operations complete, one or more failures
UNABLE_TO_CALCULATE_MATCHES = 0xA701  # Refused: Out of Resources - Unable to calculate number of matches
UNABLE_TO_PERFORM_SUB_OPERATIONS = 0xA702  # Refused: Out of Resources - Unable to perform sub-operations

"""The append-only audit log: see the access and audit issue."""

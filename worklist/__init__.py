"""RIS orders, modality worklist and MPPS: see the worklist issue."""

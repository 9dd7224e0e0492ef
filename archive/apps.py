from django.apps import AppConfig


class ArchiveConfig(AppConfig):
    name = "archive"
    verbose_name = "Archive"

    def ready(self) -> None:
        import pydicom.config

        # The archive keeps datasets as received and checks what it depends on itself
        # (identifying UIDs, structure): pydicom's per-value validation on reading only
        # costs time (a regular expression per value) and fills the logs with warnings.
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        # Likewise for the datasets the archive builds (C-FIND answers, responses): their
        # values come from the database in DICOM form already.
        pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE

        from django.db.models.signals import m2m_changed, post_delete, post_save

        from archive.access import forget_nodes, label_new_series
        from archive.models import RemoteNode

        for signal in (post_save, post_delete):
            signal.connect(forget_nodes, sender=RemoteNode, dispatch_uid=f"archive.forget_nodes.{signal}")
        m2m_changed.connect(forget_nodes, sender=RemoteNode.access_labels.through, dispatch_uid="archive.forget_nodes.labels")
        from archive.ingest import instance_stored, series_received
        from archive.tasks import queue_prerender

        series_received.connect(queue_prerender, dispatch_uid="archive.queue_prerender")
        instance_stored.connect(label_new_series, dispatch_uid="archive.label_new_series")

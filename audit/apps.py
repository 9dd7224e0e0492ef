from django.apps import AppConfig


class AuditConfig(AppConfig):
    name = "audit"
    verbose_name = "Audit log"

    def ready(self) -> None:
        from axes.signals import user_locked_out

        from audit import signals

        user_locked_out.connect(signals.on_locked_out, dispatch_uid="audit.locked_out")

"""On PostgreSQL, compress each instance's header (``archive_instance.metadata``) with LZ4
instead of the default PGLZ: a CT slice's header (5.7 KB of JSON) is compressed on every
insert, and ``pglz_compress`` was the function with the most samples in a ``perf`` profile of
the PostgreSQL backends during an ingest. By hand, LZ4 took 0.26-0.27 against 0.31 ms of
the server's CPU an insert (docs/performance.md).

Only new values are compressed the new way; a server built without LZ4 (or older than
PostgreSQL 14) keeps PGLZ, with a notice, since the migration must not fail for a speed-up.
"""

from django.db import migrations

FORWARD = """
DO $$
BEGIN
    ALTER TABLE archive_instance ALTER COLUMN metadata SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR syntax_error OR invalid_parameter_value THEN
    RAISE NOTICE 'archive_instance.metadata keeps the default compression: %', SQLERRM;
END
$$;
"""
BACKWARD = """
DO $$
BEGIN
    ALTER TABLE archive_instance ALTER COLUMN metadata SET COMPRESSION pglz;
EXCEPTION WHEN feature_not_supported OR syntax_error OR invalid_parameter_value THEN
    NULL;
END
$$;
"""


def forward(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FORWARD, params=None)


def backward(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(BACKWARD, params=None)


class Migration(migrations.Migration):
    dependencies = [("archive", "0006_add_instance_function")]
    operations = [migrations.RunPython(forward, backward)]

"""Four of archive_instance's nine indexes go: every stored instance wrote each of them, and
no query reads them.

- ``series_id`` alone: ``instance_series_number_idx`` (series_id, instance_number) starts
  with the same column and serves every lookup by series. The field keeps its foreign key
  (``db_index=False`` only); the index is dropped in place, on both databases, instead of
  Django's way (SQLite would copy the whole table, PostgreSQL would validate the foreign
  key again over every row).
- PostgreSQL's ``varchar_pattern_ops`` copies of the SOP Instance UID, SOP Class UID and
  file path indexes (``..._like``), which Django adds to every indexed text column for
  ``LIKE 'prefix%'``. Nothing matches these columns by prefix: UIDs match whole or by list
  (PS3.4 C.2.2.2.2; no wildcards in UIDs, C.2.2.2.4), files by their whole path. Their
  plain indexes (and the unique constraints) stay. Should a later change of one of these
  fields remove its index, Django drops the ``_like`` one with ``IF EXISTS``.

Measured by hand on PostgreSQL 15, 2,000 ``archive_add_instance`` calls in one session:
see docs/performance.md.
"""

from django.db import migrations, models

SERIES_INDEX = "archive_instance_series_id_d920b877"
LIKE_COLUMNS = ("sop_instance_uid", "sop_class_uid", "file_path")


def _like_names(schema_editor) -> list[str]:
    # The names Django gave them (its own rule: table, column, hash, suffix).
    return [schema_editor._create_index_name("archive_instance", [column], suffix="_like") for column in LIKE_COLUMNS]


def drop_like(apps, schema_editor) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    for name in _like_names(schema_editor):
        schema_editor.execute(f"DROP INDEX IF EXISTS {schema_editor.quote_name(name)}", params=None)


def create_like(apps, schema_editor) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    for name, column in zip(_like_names(schema_editor), LIKE_COLUMNS):
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {schema_editor.quote_name(name)} "
            f"ON archive_instance ({schema_editor.quote_name(column)} varchar_pattern_ops)",
            params=None,
        )


class Migration(migrations.Migration):
    dependencies = [("archive", "0007_metadata_lz4")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="instance",
                    name="series",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="instances",
                        to="archive.series",
                    ),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    f'DROP INDEX IF EXISTS "{SERIES_INDEX}"',
                    reverse_sql=f'CREATE INDEX IF NOT EXISTS "{SERIES_INDEX}" ON "archive_instance" ("series_id")',
                ),
            ],
        ),
        migrations.RunPython(drop_like, create_like),
    ]

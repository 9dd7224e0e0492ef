"""On PostgreSQL, ``archive_add_instance``: index one instance of a known series in one
round trip (archive.ingest, the hot path).

It inserts the instance's row and adds it to its study's and its series' counts, in that
order (the order every ingest transaction takes its locks in), and returns the new row's
primary key. Called as one statement in autocommit, it is one transaction: the client
waits for one answer instead of six (BEGIN, INSERT, two UPDATEs, COMMIT), and PL/pgSQL
keeps the three statements' plans for the session. Its parameters follow
``archive.ingest._INSTANCE_COLUMNS``; a change of those columns needs a new version here.
"""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION archive_add_instance(
    p_study bigint, p_size bigint, p_series bigint,
    p_sop_instance_uid varchar, p_sop_class_uid varchar, p_instance_number integer,
    p_transfer_syntax_uid varchar, p_rows integer, p_columns integer, p_bits_allocated integer,
    p_number_of_frames integer, p_image_position_patient jsonb, p_image_orientation_patient jsonb,
    p_slice_location double precision, p_specific_character_set varchar, p_file_path varchar,
    p_file_size bigint, p_file_sha256 varchar, p_metadata jsonb, p_source_ae_title varchar,
    p_source_address varchar, p_created timestamptz
) RETURNS bigint AS $$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO archive_instance (
        series_id, sop_instance_uid, sop_class_uid, instance_number, transfer_syntax_uid, "rows",
        "columns", bits_allocated, number_of_frames, image_position_patient,
        image_orientation_patient, slice_location, specific_character_set, file_path, file_size,
        file_sha256, metadata, source_ae_title, source_address, created
    ) VALUES (
        p_series, p_sop_instance_uid, p_sop_class_uid, p_instance_number, p_transfer_syntax_uid,
        p_rows, p_columns, p_bits_allocated, p_number_of_frames, p_image_position_patient,
        p_image_orientation_patient, p_slice_location, p_specific_character_set, p_file_path,
        p_file_size, p_file_sha256, p_metadata, p_source_ae_title, p_source_address, p_created
    ) RETURNING id INTO new_id;
    UPDATE archive_study
       SET number_of_study_related_instances = number_of_study_related_instances + 1,
           study_size = study_size + p_size
     WHERE id = p_study;
    UPDATE archive_series
       SET number_of_series_related_instances = number_of_series_related_instances + 1,
           series_size = series_size + p_size
     WHERE id = p_series;
    RETURN new_id;
END;
$$ LANGUAGE plpgsql VOLATILE;
"""
DROP = """
DROP FUNCTION IF EXISTS archive_add_instance(
    bigint, bigint, bigint, varchar, varchar, integer, varchar, integer, integer, integer, integer,
    jsonb, jsonb, double precision, varchar, varchar, bigint, varchar, jsonb, varchar, varchar, timestamptz
);
"""


def create(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=None)


def drop(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):
    dependencies = [("archive", "0005_sendjob")]
    operations = [migrations.RunPython(create, drop)]

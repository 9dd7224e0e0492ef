"""On PostgreSQL, ``audit_append``: chain and insert an event in one round trip.

It takes the chain's advisory lock, reads the last hash (each statement of a PL/pgSQL
function sees the rows committed before it ran, so the read follows the lock) and inserts
the row with hash = SHA-256(previous hash, newline, canonical body), the same formula as
``AuditEvent.compute_hash``.
"""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION audit_append(
    p_lock bigint, p_time timestamptz, p_user_id integer, p_actor varchar, p_role varchar,
    p_action varchar, p_channel varchar, p_outcome varchar, p_patient_id varchar,
    p_study_instance_uid varchar, p_source_address varchar, p_user_agent varchar,
    p_details jsonb, p_body text
) RETURNS TABLE (id bigint, previous_hash varchar, hash varchar) AS $$
DECLARE
    previous varchar;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    SELECT e.hash INTO previous FROM audit_auditevent e ORDER BY e.id DESC LIMIT 1;
    previous := COALESCE(previous, repeat('0', 64));
    RETURN QUERY
    INSERT INTO audit_auditevent AS e (
        time, user_id, actor, role, action, channel, outcome, patient_id, study_instance_uid,
        source_address, user_agent, details, previous_hash, hash
    ) VALUES (
        p_time, p_user_id, p_actor, p_role, p_action, p_channel, p_outcome, p_patient_id,
        p_study_instance_uid, p_source_address, p_user_agent, p_details, previous,
        encode(sha256(convert_to(previous || E'\\n' || p_body, 'UTF8')), 'hex')
    ) RETURNING e.id::bigint, e.previous_hash, e.hash;
END;
$$ LANGUAGE plpgsql VOLATILE;
"""
DROP = "DROP FUNCTION IF EXISTS audit_append(bigint, timestamptz, integer, varchar, varchar, varchar, varchar, varchar, varchar, varchar, varchar, varchar, jsonb, text);"


def create(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=None)


def drop(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):
    dependencies = [("audit", "0002_append_only_trigger")]
    operations = [migrations.RunPython(create, drop)]

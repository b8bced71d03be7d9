"""foundation: profiles, mailboxes, directory, alerts, settings

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "org_settings",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_org_settings")),
    )
    op.create_table(
        "parties",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("tracking_rule", sa.String(length=30), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_parties")),
        sa.UniqueConstraint("kind", "key", name="uq_parties_kind_key"),
    )
    op.create_table(
        "profiles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("incoming_host", sa.String(length=255), nullable=True),
        sa.Column("incoming_port", sa.Integer(), nullable=True),
        sa.Column("incoming_tls", sa.String(length=10), nullable=True),
        sa.Column("outgoing_host", sa.String(length=255), nullable=True),
        sa.Column("outgoing_port", sa.Integer(), nullable=True),
        sa.Column("outgoing_tls", sa.String(length=10), nullable=True),
        sa.Column("credential_source", sa.String(length=10), nullable=False),
        sa.Column("service_user", sa.String(length=255), nullable=True),
        sa.Column("service_secret", sa.Text(), nullable=True),
        sa.Column("use_impersonation", sa.Boolean(), nullable=False),
        sa.Column("impersonation_method", sa.String(length=20), nullable=False),
        sa.Column("use_same_settings_for_outgoing", sa.Boolean(), nullable=False),
        sa.Column("outgoing_credential_source", sa.String(length=10), nullable=True),
        sa.Column("outgoing_service_user", sa.String(length=255), nullable=True),
        sa.Column("outgoing_service_secret", sa.Text(), nullable=True),
        sa.Column("allow_plaintext", sa.Boolean(), nullable=False),
        sa.Column("ca_file", sa.Text(), nullable=True),
        sa.Column("dav_url", sa.Text(), nullable=True),
        sa.Column("ews_url", sa.Text(), nullable=True),
        sa.Column("tenant_id", sa.String(length=64), nullable=True),
        sa.Column("client_id", sa.String(length=255), nullable=True),
        sa.Column("client_secret", sa.Text(), nullable=True),
        sa.Column("token_url", sa.Text(), nullable=True),
        sa.Column("api_url", sa.Text(), nullable=True),
        sa.Column("shared_namespace", sa.String(length=255), nullable=False),
        sa.Column("process_email_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("min_polling_interval_s", sa.Integer(), nullable=False),
        sa.Column("max_concurrent_connections", sa.Integer(), nullable=False),
        sa.Column("move_failed_to_folder", sa.String(length=255), nullable=True),
        sa.Column("send_alert_email", sa.Boolean(), nullable=False),
        sa.Column("alert_owner", sa.String(length=255), nullable=True),
        sa.Column("connection_timeout_s", sa.Float(), nullable=False),
        sa.Column("impersonation_scope", sa.JSON(), nullable=False),
        sa.Column("conflict_policy", sa.String(length=30), nullable=False),
        sa.Column("remove_unfiltered", sa.Boolean(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_profiles")),
        sa.UniqueConstraint("name", name=op.f("uq_profiles_name")),
    )
    op.create_table(
        "mailboxes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("owner_kind", sa.String(length=10), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("profile_id", sa.Integer(), nullable=False),
        sa.Column("incoming_method", sa.String(length=20), nullable=False),
        sa.Column("incoming_enabled", sa.Boolean(), nullable=False),
        sa.Column("incoming_status", sa.String(length=10), nullable=False),
        sa.Column("outgoing_method", sa.String(length=20), nullable=False),
        sa.Column("outgoing_enabled", sa.Boolean(), nullable=False),
        sa.Column("outgoing_status", sa.String(length=10), nullable=False),
        sa.Column("act_method", sa.String(length=20), nullable=False),
        sa.Column("act_enabled", sa.Boolean(), nullable=False),
        sa.Column("act_status", sa.String(length=10), nullable=False),
        sa.Column("allow_credentials", sa.Boolean(), nullable=False),
        sa.Column("username", sa.String(length=255), nullable=True),
        sa.Column("secret", sa.Text(), nullable=True),
        sa.Column("approval", sa.String(length=10), nullable=False),
        sa.Column("process_email_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("after_processing", sa.String(length=10), nullable=False),
        sa.Column("after_processing_folder", sa.String(length=255), nullable=True),
        sa.Column("tracking_rule", sa.String(length=30), nullable=False),
        sa.Column("folders", sa.JSON(), nullable=False),
        sa.Column("track_sent", sa.Boolean(), nullable=False),
        sa.Column("last_tested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["profile_id"],
            ["profiles.id"],
            name=op.f("fk_mailboxes_profile_id_profiles"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mailboxes")),
        sa.UniqueConstraint("address", name=op.f("uq_mailboxes_address")),
    )
    with op.batch_alter_table("mailboxes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_mailboxes_profile_id"), ["profile_id"], unique=False)

    op.create_table(
        "party_emails",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("party_id", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["party_id"],
            ["parties.id"],
            name=op.f("fk_party_emails_party_id_parties"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_party_emails")),
        sa.UniqueConstraint("party_id", "address", name="uq_party_emails_party"),
    )
    with op.batch_alter_table("party_emails", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_party_emails_address"), ["address"], unique=False)

    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("severity", sa.String(length=10), nullable=False),
        sa.Column("code", sa.String(length=50), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("fix", sa.Text(), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=True),
        sa.Column("profile_id", sa.Integer(), nullable=True),
        sa.Column("channel", sa.String(length=10), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_alerts_mailbox_id_mailboxes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["profile_id"],
            ["profiles.id"],
            name=op.f("fk_alerts_profile_id_profiles"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alerts_code"), ["code"], unique=False)
        batch_op.create_index(batch_op.f("ix_alerts_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_alerts_mailbox_id"), ["mailbox_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_alerts_profile_id"), ["profile_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alerts_profile_id"))
        batch_op.drop_index(batch_op.f("ix_alerts_mailbox_id"))
        batch_op.drop_index(batch_op.f("ix_alerts_created_at"))
        batch_op.drop_index(batch_op.f("ix_alerts_code"))

    op.drop_table("alerts")
    with op.batch_alter_table("party_emails", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_party_emails_address"))

    op.drop_table("party_emails")
    with op.batch_alter_table("mailboxes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mailboxes_profile_id"))

    op.drop_table("mailboxes")
    op.drop_table("profiles")
    op.drop_table("parties")
    op.drop_table("org_settings")

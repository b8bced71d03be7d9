"""Graph certificate credentials and lifecycle notifications

``profiles.client_certificate``: an Exchange Online profile's PEM certificate + private key
for signed client assertions (`connectors.certificates`), encrypted at rest like
``client_secret`` (listed in ``tables.SECRET_COLUMNS``).

``graph_subscriptions.lifecycle_url``: the ``lifecycleNotificationUrl`` a subscription was
created with. Graph cannot add one to an existing subscription, so rows without it (every
row made before this revision) are deleted and created again by the next
`services.graph_subscriptions.GraphSubscriptions.ensure`.

Revision ID: 0012
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("profiles") as batch:
        batch.add_column(sa.Column("client_certificate", sa.Text(), nullable=True))
    with op.batch_alter_table("graph_subscriptions") as batch:
        batch.add_column(sa.Column("lifecycle_url", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("graph_subscriptions") as batch:
        batch.drop_column("lifecycle_url")
    with op.batch_alter_table("profiles") as batch:
        batch.drop_column("client_certificate")

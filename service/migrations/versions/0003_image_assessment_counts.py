"""How many images each stored result analysed and how many of those the domain
guard flagged (not assessed), so ``/metrics`` sums two integer columns instead of
parsing every result's JSON at each scrape. Results stored before are counted
once, here.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

from service.migrations.types import INTEGER

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_COLUMNS = ("images_analysed", "images_not_assessed")


def upgrade() -> None:
    for name in _COLUMNS:
        op.add_column("results", sa.Column(name, INTEGER(), nullable=False, server_default=sa.text("0")))
    db = op.get_bind()
    rows = db.execute(sa.text("SELECT study_uid, generation, result FROM results")).fetchall()
    for study_uid, generation, result in rows:
        images = [i for i in json.loads(result).get("images", []) if i.get("frames")]
        db.execute(
            sa.text(
                "UPDATE results SET images_analysed=:analysed, images_not_assessed=:flagged"
                " WHERE study_uid=:study_uid AND generation=:generation"
            ),
            {
                "analysed": len(images),
                "flagged": sum(bool(i.get("out_of_distribution")) for i in images),
                "study_uid": study_uid,
                "generation": generation,
            },
        )


def downgrade() -> None:
    for name in reversed(_COLUMNS):
        op.drop_column("results", name)

"""Runs ``konsul`` with the ACL blueprint registered on its HTTP app.

Until ``create_app`` registers ``acl_api`` itself, the ACL API tests start
their edge through this module; once it does, this changes nothing.
"""

from __future__ import annotations

import sys

import konsul.protocols.http as http
from konsul.edge.cli import main
from konsul.protocols.http.acl_routes import acl_api

_create_app = http.create_app


def create_app(ctx, extra_blueprints=()):
    app = _create_app(ctx, extra_blueprints)
    if acl_api.name not in app.blueprints:
        app.register_blueprint(acl_api)
    return app


http.create_app = create_app

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

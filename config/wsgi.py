from __future__ import annotations

import os

from config.entrypoint import configure_or_exit

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
configure_or_exit()

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()

"""The platform's settings for its test suite: the same in every way but the password hash.

PBKDF2's million rounds take half a second per password on CI's two cores, and the suite creates and logs
in thousands of users. Child processes the tests start inherit DJANGO_SETTINGS_MODULE, so they verify the
same hashes."""

from config.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

"""The first admin of a fresh deployment, without any default password.

Either the deployment chooses the key (``MURALIST_ADMIN_KEY``, e.g. from a Kubernetes secret), or a
server that must authenticate and has no users yet creates ``admin`` with a random key and prints
it once. Only the key's hash is stored, so it can never be shown again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from ..errors import InvalidRequestError, MuralistError
from .app import LOCAL_USER
from .store import MIN_KEY_CHARS, Store

log = logging.getLogger("muralist.service")


def bootstrap_admin(store: Store, needs_auth: bool, environ: Mapping[str, str] | None = None) -> str | None:
    """Create the first admin if configured or needed. Returns a newly generated key that the
    caller must show once, else None (nothing created, or the key was the deployment's own)."""
    env = os.environ if environ is None else environ
    key = env.get("MURALIST_ADMIN_KEY", "")
    name = env.get("MURALIST_ADMIN_NAME", "").strip() or "admin"
    if key:
        key = key.strip()
        # Checked here too: add_user's InvalidRequestError below means 'another replica won'.
        if len(key) < MIN_KEY_CHARS:
            raise MuralistError(f"MURALIST_ADMIN_KEY is {len(key)} characters long: use at least {MIN_KEY_CHARS} "
                                "(e.g. the output of: openssl rand -hex 24)")
        if store.get_user(name) is not None:
            log.info("admin user %r exists; MURALIST_ADMIN_KEY left it unchanged", name)
            return None
        try:
            store.add_user(name, admin=True, key=key)
        except InvalidRequestError as e:  # another replica created it at the same moment
            log.info("admin user %r not created: %s", name, e)
            return None
        log.info("created admin user %r with the key from MURALIST_ADMIN_KEY", name)
        return None
    if not needs_auth or any(u.name != LOCAL_USER for u in store.list_users()):
        return None
    try:
        return store.add_user("admin", admin=True)
    except InvalidRequestError:  # another replica was first; its log shows the key
        return None

"""Real OpenStack services (Keystone, Glance) that the test suite starts on 127.0.0.1.

Each service runs from its own plain venv that `scripts/setup` installs under
`${CAREEN_CACHE:-~/.cache/careen}/services/`, with all of its state under one temporary
directory. The session fixture `cloud` (in `fixtures.py`) starts them on first use.
"""

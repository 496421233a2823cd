"""A connection to the cloud, found like the `openstack` client finds it.

`--os-cloud NAME`, else `OS_CLOUD`, names an entry of clouds.yaml (looked up where
openstacksdk looks: `OS_CLIENT_CONFIG_FILE`, the current directory, ~/.config/openstack,
/etc/openstack); without either, the `OS_*` variables (`OS_AUTH_URL`, `OS_USERNAME`...)
describe the cloud. `Cloud` wraps the image API's HTTP adapter with the few calls careen
needs and turns HTTP failures into `CareenError`s.
"""

from __future__ import annotations

import html
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from careen import limits
from careen.errors import CareenError

log = logging.getLogger(__name__)

JSON_PATCH = "application/openstack-images-v2.1-json-patch"
OCTET = "application/octet-stream"


class GlanceError(CareenError):
    """Glance answered with an error."""

    def __init__(self, message: str, hint: str = "", status: int | None = None) -> None:
        super().__init__(message, hint)
        self.status = status


@dataclass
class Cloud:
    """An authenticated connection and what careen asks about the caller."""

    conn: Any  # openstack.connection.Connection
    name: str | None

    @property
    def project_id(self) -> str:
        return str(self.conn.current_project_id)

    @property
    def roles(self) -> list[str]:
        auth = self.conn.session.auth
        access = auth.get_access(self.conn.session)
        return [r.lower() for r in (access.role_names or [])]

    @property
    def is_admin(self) -> bool:
        # Glance's default policy: publicizing images and setting another project's
        # owner need the admin role.
        return "admin" in self.roles

    def _api(self) -> Any:
        return self.conn.image

    def request(
        self,
        method: str,
        path: str,
        *,
        ok: Iterable[int] = (200, 201, 204),
        what: str,
        **kwargs: Any,
    ) -> Any:
        limits.pace()  # a fleet's Glance request rate, when it sets one
        try:
            response = self._api().request(path, method, raise_exc=False, **kwargs)
        except CareenError:
            raise
        except Exception as e:  # keystoneauth's connection and auth failures
            raise CareenError(
                f"cannot reach Glance to {what}: {e}",
                hint="check --os-cloud / OS_CLOUD and that the cloud is reachable",
            ) from e
        if response.status_code not in set(ok):
            raise _http_error(response, what)
        return response

    def get_json(self, path: str, *, what: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = self.request("GET", path, what=what, **kwargs).json()
        return body

    def close(self) -> None:
        self.conn.close()
        session = getattr(self.conn.session, "session", None)
        if session is not None:
            session.close()


def _http_error(response: Any, what: str) -> GlanceError:
    status = int(response.status_code)
    detail = _plain(response.text or "")[:300]
    hints = {
        401: "check the credentials in clouds.yaml or OS_* variables",
        403: "the cloud's policy does not allow this for your user; ask an admin",
        404: "check the image ID or name (glance:ID or glance:NAME)",
        409: "the image is in a state that does not allow this",
        413: "a quota was exceeded (image properties, tags, or storage)",
    }
    return GlanceError(
        f"Glance refused to {what}: HTTP {status}: {detail}",
        hint=hints.get(status, "see the message from Glance"),
        status=status,
    )


def _plain(text: str) -> str:
    """Glance's error pages are HTML: keep the sentence, drop the markup and the title."""
    body = text.split("</h1>", 1)[-1]
    return html.unescape(" ".join(re.sub(r"<[^>]*>", " ", body).split()))


def connect(cloud_name: str | None = None) -> Cloud:
    """Authenticate to the cloud named by `cloud_name`, OS_CLOUD, or the OS_* variables."""
    import openstack  # imported only when Glance is used: it is slow to import
    from openstack import exceptions

    name = cloud_name or os.environ.get("OS_CLOUD") or None
    try:
        conn = openstack.connect(cloud=name)
        conn.authorize()
    except exceptions.ConfigException as e:
        raise CareenError(
            f"no cloud configuration: {e}",
            hint="name a cloud of clouds.yaml with --os-cloud or OS_CLOUD, or set OS_AUTH_URL "
            "and the other OS_* variables",
        ) from e
    except Exception as e:  # keystoneauth raises many types for one meaning
        raise CareenError(
            f"cannot log in to the cloud {name or '(from OS_* variables)'}: {e}",
            hint="check the cloud's auth settings and that Keystone is reachable",
        ) from e
    log.debug("connected to cloud %s as project %s", name, conn.current_project_id)
    return Cloud(conn, name)


def stream(response: Any, chunk: int) -> Iterator[bytes]:
    yield from response.iter_content(chunk_size=chunk)

"""``nwbcache.dandi_url``: the proxied URL of a DANDI asset, found with dandi's own client."""

from __future__ import annotations

from .urls import _proxy, proxied_url

__all__ = ["asset_url", "dandi_url"]


def asset_url(
    dandiset_id: str, path: str, version: str = "draft", api_url: str | None = None
) -> str:
    """The S3 URL of an asset's bytes, as the DANDI tutorials find it.

    ``api_url`` None means dandi's default: the DANDI Archive
    (:data:`nwbcache.urls.DANDI_API_URL`) unless ``DANDI_INSTANCE`` names
    another instance. The API answers ``/download/`` with a redirect to a
    presigned URL; its query is stripped, as the bucket is public and a
    signature would only expire.
    """
    # Imported here: dandi pulls in pydantic, requests and more, and only
    # this function needs it.
    from dandi.dandiapi import DandiAPIClient

    with DandiAPIClient(api_url=api_url) as client:
        asset = client.get_dandiset(dandiset_id, version).get_asset_by_path(path)
        return str(asset.get_content_url(follow_redirects=1, strip_query=True))


def dandi_url(
    dandiset_id: str,
    path: str,
    version: str = "draft",
    api_url: str | None = None,
    proxy: str | None = None,
) -> str:
    """The URL under the daemon (``proxy``, default ``$NWBCACHE_URL``) of a DANDI asset.

    E.g. ``dandi_url("000006", "sub-anm369962/sub-anm369962_ses-20170310.nwb")``.
    """
    _proxy(proxy)  # a missing or malformed proxy fails before the API is asked
    return proxied_url(asset_url(dandiset_id, path, version, api_url), proxy)

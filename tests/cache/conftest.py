from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import SeaweedFS
from warmserve.cache.stores import Store, open_store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The contract suite's parameter: every test using it runs against each store."""
    if request.param == "local":
        s = open_store(str(tmp_path / "store"))
    else:
        server: SeaweedFS = request.getfixturevalue("s3_server")
        s = open_store(request.getfixturevalue("s3_url"), server.storage_options())
    yield s
    s.close()

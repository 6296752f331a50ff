"""Where the pinned upstream CRDs come from, and one verdict for every test that needs them.

Given a CRD in none of its places, every CRD-dependent test skips outside CI and fails
under it; a fetch caches only the file the pinned digest names. The fetch runs against
a real HTTP server on loopback.
"""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from manifests import upstream_crds
from manifests.upstream_crds import CRDS, CrdFetchFailed
from tests.conftest import require_upstream_crds


def _offline() -> list[str]:
    return ["no network in this test"]


def _nowhere(tmp_path: Path, **extra: str) -> dict[str, str]:
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    return {"KEDA_CRD_DIR": str(empty), "RABBITMQ_CRD_DIR": str(empty), **extra}


def test_given_no_crd_anywhere_then_a_crd_test_skips_outside_ci_saying_how(
    tmp_path: Path,
) -> None:
    with pytest.raises(pytest.skip.Exception, match="task crds"):
        require_upstream_crds(_nowhere(tmp_path), tmp_path / "no-shared", _offline)


def test_given_no_crd_anywhere_under_ci_then_a_crd_test_fails(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="KEDA_CRD_DIR"):
        require_upstream_crds(_nowhere(tmp_path, CI="true"), tmp_path / "no-shared", _offline)


@pytest.fixture
def pinned_files(tmp_path: Path) -> Path:
    """The pinned CRD files as this machine has them, copied into one folder."""
    require_upstream_crds()
    folder = tmp_path / "pinned"
    folder.mkdir()
    for crd in CRDS:
        found = upstream_crds.locate(crd)
        assert found is not None
        shutil.copy(found, folder / crd.filename)
    return folder


def test_given_the_variables_then_only_their_folders_are_read(pinned_files: Path, tmp_path: Path) -> None:
    env = {"KEDA_CRD_DIR": str(pinned_files), "RABBITMQ_CRD_DIR": str(pinned_files)}

    assert upstream_crds.missing(env, tmp_path / "no-shared") == []
    assert {upstream_crds.locate(crd, env) for crd in CRDS} == {pinned_files / crd.filename for crd in CRDS}
    require_upstream_crds(env, tmp_path / "no-shared", _offline)


@pytest.fixture
def upstream(pinned_files: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server laid out as GitHub's raw files; yields (base URL, its root)."""
    root = tmp_path / "upstream"
    for crd in CRDS:
        target = root / crd.url("").lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pinned_files / crd.filename, target)
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_given_no_crd_here_then_fetching_caches_the_pinned_files_once(
    upstream: tuple[str, Path], tmp_path: Path
) -> None:
    base_url, _root = upstream
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    shared = tmp_path / "no-shared"
    assert len(upstream_crds.missing(env, shared)) == len(CRDS)

    problems = upstream_crds.fetch_missing(env, shared, base_url)

    assert problems == []
    assert upstream_crds.missing(env, shared) == []
    assert all(
        str(upstream_crds.locate(crd, env, shared)).startswith(str(tmp_path / "cache")) for crd in CRDS
    )
    # Found in the cache, nothing is fetched again (a dead server would fail otherwise).
    assert upstream_crds.fetch_missing(env, shared, "http://127.0.0.1:9") == []


def test_given_a_file_that_is_not_the_pinned_one_then_it_is_refused_and_not_cached(
    upstream: tuple[str, Path], tmp_path: Path
) -> None:
    base_url, root = upstream
    crd = CRDS[0]
    served = root / crd.url("").lstrip("/")
    served.write_text(served.read_text() + "\n# changed upstream\n")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}

    with pytest.raises(CrdFetchFailed, match="is not the pinned"):
        upstream_crds.fetch(crd, env, base_url)

    assert upstream_crds.locate(crd, env, tmp_path / "no-shared") is None


def test_given_no_server_then_fetching_says_which_url_failed(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}

    problems = upstream_crds.fetch_missing(env, tmp_path / "no-shared", "http://127.0.0.1:9")

    assert len(problems) == len(CRDS)
    assert all(problem.startswith("cannot fetch http://127.0.0.1:9/") for problem in problems)


def test_the_monitoring_crds_kept_here_are_the_pinned_charts_files() -> None:
    for crd in upstream_crds.VENDORED_CRDS:
        path = upstream_crds.locate(crd)
        assert path is not None, f"{crd.filename} is missing from manifests/crds/"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == crd.sha256, crd.url()

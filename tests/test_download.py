"""URL manifests and the downloader, against a loopback HTTP server that serves good
images and every failure the issue names (404, 500, slow, truncated, not an image, too
large, a redirect loop, compressed bombs): nothing leaves the machine. The loopback
server is reached through the allow-list setting (CARSEARCH_DOWNLOAD__ALLOW_NETWORKS);
without it, loopback and redirects to it are refused unasked. Then `carsearch ingest
manifest` on an Unsplash-style photos.tsv000, twice (the second run fetches nothing)."""

from __future__ import annotations

import ipaddress
import json
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from carsearch.ingest.download import Downloader, is_url_manifest, read_url_manifest
from carsearch.ingest.netguard import REFUSED, AddressPolicy
from carsearch.platform.errors import CarsearchError
from fixtures.cli import invoke  # `env`: tests/fixtures/cli.py (in-process)
from fixtures.site import Site, bomb  # the `site` fixtures: tests/fixtures/site.py

FAILS = {
    "/missing.jpg": "HTTP 404", "/broken.jpg": "HTTP 500", "/slow.jpg": "timed out",
    "/truncated.jpg": "truncated", "/page.html": "not an image (content-type text/html)",
    "/huge.jpg": "too large", "/endless.jpg": "too large", "/junk.jpg": "not a usable image",
    "/loop": "redirect loop",
}


def _downloader(tmp_path: Path, allow: str = "127.0.0.0/8") -> Downloader:
    d = Downloader(tmp_path / "images", tmp_path / "downloads.jsonl", concurrency=4,
                   timeout_s=0.5, retries=2, max_bytes=100_000, allow_networks=allow)
    d.sleep = lambda s: None  # the backoff's waits, not its count, are skipped
    return d


def test_every_failure_has_its_reason_and_good_images_land_in_the_store(
        site: tuple[str, Site], tmp_path: Path) -> None:
    base, state = site
    urls = [base + p for p in [*state.images, "/flaky.jpg", "/moved", *FAILS]]
    got = _downloader(tmp_path).fetch_all(urls, progress=False)
    for path in [*state.images, "/flaky.jpg", "/moved"]:
        rec = got[base + path]
        assert rec.status == "fetched", rec
        assert rec.path and Path(rec.path).is_file()
        assert Path(rec.path).parent.parent == tmp_path / "images"  # content-addressed
        assert Path(rec.path).stem == rec.sha256
    assert got[base + "/moved"].sha256 == got[base + "/img0.jpg"].sha256
    assert got[base + "/flaky.jpg"].attempts == 2  # one 503, then the image
    for path, reason in FAILS.items():
        rec = got[base + path]
        assert rec.status == "failed" and reason in str(rec.reason), (path, rec)
    # What may pass was retried (1 + 2 retries); what will not, asked once.
    assert state.hits["/broken.jpg"] == 3 and state.hits["/missing.jpg"] == 1
    assert not got[base + "/broken.jpg"].final and got[base + "/missing.jpg"].final
    assert not list((tmp_path / "images").rglob("*.part"))


def test_a_second_run_fetches_nothing_twice(site: tuple[str, Site], tmp_path: Path) -> None:
    base, state = site
    urls = [base + p for p in [*state.images, "/missing.jpg", "/broken.jpg"]]
    _downloader(tmp_path).fetch_all(urls, progress=False)
    before = Counter(state.hits)
    again = _downloader(tmp_path).fetch_all([*urls, urls[0]], progress=False)
    new = state.hits - before
    assert new == Counter({"/broken.jpg": 3})  # only what may pass is asked again
    assert {again[base + p].status for p in state.images} == {"cached"}
    assert again[base + "/missing.jpg"].reason == "HTTP 404"
    retried = _downloader(tmp_path).fetch_all(urls, progress=False, retry_failed=True)
    assert state.hits["/missing.jpg"] == 2 and retried[base + "/missing.jpg"].final
    # A stored file that changed is fetched again.
    path = Path(str(again[urls[0]].path))
    path.write_bytes(b"changed")
    third = _downloader(tmp_path).fetch_all(urls[:1], progress=False)
    assert third[urls[0]].status == "fetched" and Path(str(third[urls[0]].path)).read_bytes() \
        == state.images["/img0.jpg"]


def test_manifests_name_images_by_url(tmp_path: Path) -> None:
    tsv = tmp_path / "photos.tsv000"
    tsv.write_text("photo_id\tphoto_url\tphoto_image_url\tphoto_description\tai_description"
                   "\tphotographer_username\n"
                   "a1\thttps://u/p/a1\thttps://img/a1.jpg\tA red car by the sea\t\tann\n"
                   "b2\thttps://u/p/b2\thttps://img/b2.jpg\t\ta dog on grass\tbob\n")
    rows = read_url_manifest(tsv)
    assert is_url_manifest(tsv)
    assert [(r.line, r.url) for r in rows] == [(2, "https://img/a1.jpg"),
                                               (3, "https://img/b2.jpg")]
    assert rows[0].meta == {"photo_id": "a1", "page_url": "https://u/p/a1",
                            "description": "A red car by the sea", "photographer": "ann",
                            "url": "https://img/a1.jpg"}
    assert rows[1].meta["description"] == "a dog on grass"
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"url": "http://x/1.jpg", "colour": "red"}) + "\n")
    assert is_url_manifest(jsonl) and read_url_manifest(jsonl)[0].meta["colour"] == "red"
    csv_file = tmp_path / "m.csv"
    csv_file.write_text("url,caption\nftp://x/1.jpg,hello\n")
    assert is_url_manifest(csv_file)
    with pytest.raises(CarsearchError, match=r"m\.csv:2: no http"):
        read_url_manifest(csv_file)
    (tmp_path / "paths.jsonl").write_text(json.dumps({"path": "a.jpg"}) + "\n")
    assert not is_url_manifest(tmp_path / "paths.jsonl")


def test_ingest_an_unsplash_manifest_twice(site: tuple[str, Site], env: dict[str, str],
                                           tmp_path: Path, compact_model: Path) -> None:
    base, state = site
    env = {**env, "CARSEARCH_DOWNLOAD__ALLOW_NETWORKS": "127.0.0.0/8"}  # the test server
    invoke(["db", "upgrade"], env)
    invoke(["models", "publish", str(compact_model), "--name", "v1", "--promote"], env)
    lines = ["photo_id\tphoto_image_url\tphoto_description\tphotographer_username"]
    for i, path in enumerate([*state.images, "/missing.jpg", "/page.html"]):
        lines.append(f"p{i}\t{base}{path}\tphoto number {i} of a street\tuser{i}")
    tsv = tmp_path / "photos.tsv000"
    tsv.write_text("\n".join(lines) + "\n")
    out = json.loads(invoke(["ingest", "manifest", str(tsv), "--source", "unsplash",
                          "--timeout", "2", "--json"], env).stdout)
    assert out["indexed"] == 4 and out["download"]["fetched"] == 4
    assert out["download"]["failed"] == 2
    assert {(f["line"], f["reason"]) for f in out["download"]["failures"]} == {
        (6, "HTTP 404"), (7, "not an image (content-type text/html)")}
    before = sum(state.hits.values())
    again = json.loads(invoke(["ingest", "manifest", str(tsv), "--source", "unsplash", "--json"],
                           env).stdout)
    assert sum(state.hits.values()) == before  # nothing fetched twice
    assert again["download"]["cached"] == 4 and again["indexed"] == 4  # idempotent
    res = json.loads(invoke(["search", "a street", "--no-parse", "--json"], env).stdout)
    assert len(res["hits"]) == 4
    assert {h["description"] for h in res["hits"]} == {
        f"photo number {i} of a street" for i in range(4)}
    assert {h["source"] for h in res["hits"]} == {"unsplash"}


# -- issue 22: compressed bodies (item 6) and the SSRF guard (item 10) ---------------------
def test_a_compressed_body_is_refused_unread(site: tuple[str, Site], tmp_path: Path) -> None:
    """Brotli and gzip bodies under the 100 kB cap that inflate to 256 and 64 MiB: the
    request asks for identity, the encoded answer is refused without decoding a byte of
    it (traced memory stays far below what it inflates to), final."""
    base, state = site
    for encoding in ("br", "gzip"):
        bomb(encoding)  # compressed before tracing: the server's memory is not counted
    tracemalloc.start()
    try:
        got = _downloader(tmp_path).fetch_all(
            [base + "/bomb-br.jpg", base + "/bomb-gzip.jpg", base + "/img0.jpg"],
            progress=False)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for encoding in ("br", "gzip"):
        rec = got[f"{base}/bomb-{encoding}.jpg"]
        assert rec.status == "failed" and rec.final, rec
        assert rec.reason == (f"refused: an encoded body (Content-Encoding {encoding}); "
                              "only identity is accepted"), rec
    assert got[base + "/img0.jpg"].status == "fetched"
    assert set(state.encodings) == {"identity"}
    assert peak < 16 * 1024**2, peak  # 64 or 256 MiB had either been decoded


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("::1", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("fd00:ec2::254", False), ("fe80::1", False),
    ("fc00::1", False), ("100.64.0.1", False), ("224.0.0.1", False), ("ff0e::1", False),
    ("240.0.0.1", False), ("0.0.0.0", False), ("255.255.255.255", False),
    ("::ffff:127.0.0.1", False), ("2002:7f00:1::", False), ("64:ff9b::a00:1", False),
])
def test_which_addresses_a_manifest_may_reach(address: str, public: bool) -> None:
    assert AddressPolicy().allows(address) is public
    everything = AddressPolicy("0.0.0.0/0, ::/0")
    metadata = address in ("169.254.169.254", "fd00:ec2::254")
    assert everything.allows(address) is not metadata  # metadata: never
    assert AddressPolicy("10.0.0.0/8").allows("10.1.2.3")
    assert not AddressPolicy("10.0.0.0/8").allows(ipaddress.ip_address("192.168.1.1"))


def test_loopback_is_refused_unasked_without_the_setting(site: tuple[str, Site],
                                                         tmp_path: Path) -> None:
    """Without CARSEARCH_DOWNLOAD__ALLOW_NETWORKS the loopback server is never asked:
    an image, a 404 and an HTML page there all end with the same reason (no status or
    content type: nothing to learn about what answers there), final."""
    base, state = site
    urls = [base + "/img0.jpg", base + "/missing.jpg", base + "/page.html",
            base.replace("127.0.0.1", "localhost") + "/img1.jpg"]
    got = _downloader(tmp_path, allow="").fetch_all(urls, progress=False)
    assert {(r.status, r.reason, r.final) for r in got.values()} == {
        ("failed", REFUSED, True)}
    assert sum(state.hits.values()) == 0
    ledger = (tmp_path / "downloads.jsonl").read_text()
    assert "404" not in ledger and "text/html" not in ledger


def test_a_redirect_to_a_refused_address_is_refused(site: tuple[str, Site],
                                                    inner_site: tuple[str, Site],
                                                    tmp_path: Path) -> None:
    """127.0.0.1 is allowed, 127.0.0.2 (another 'internal' host) is not: a redirect
    from the first to the second is refused before the second is asked; allowed too,
    the same redirect is followed (so the refusal was the guard's)."""
    base, state = site
    inner, inner_state = inner_site
    for target in ("/img0.jpg", "/missing.jpg", "/page.html"):
        state.redirect_to = inner + target
        got = _downloader(tmp_path, allow="127.0.0.1/32").fetch(base + "/away")
        assert (got.status, got.reason, got.final) == ("failed", REFUSED, True), got
    assert sum(inner_state.hits.values()) == 0 and state.hits["/away"] == 3
    state.redirect_to = inner + "/img2.jpg"
    got = _downloader(tmp_path, allow="127.0.0.1/32, 127.0.0.2/32").fetch(base + "/away")
    assert got.status == "fetched" and inner_state.hits["/img2.jpg"] == 1


def test_a_bad_network_setting_names_its_variable() -> None:
    from carsearch.platform.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"CARSEARCH_DOWNLOAD__ALLOW_NETWORKS: .*'intranet'"):
        load_settings(download={"allow_networks": "10.0.0.0/8, intranet"})
    with pytest.raises(SettingsError, match=r"CARSEARCH_UI_TRUSTED_PROXIES: .*'proxy'"):
        load_settings(ui_trusted_proxies="proxy")
    ok = load_settings(download={"allow_networks": "127.0.0.0/8"}, ui_trusted_proxies="*")
    assert AddressPolicy(ok.download.allow_networks).allows("127.0.0.1")

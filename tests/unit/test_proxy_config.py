"""The service proxy's pure parts: what ``orchestrator.proxy`` renders and which changes need a
reload (``static_key``), the proxy rules (sites, health paths, ports, certificates), and the
parsers of HAProxy's runtime API answers (``workers.proxy``)."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator import proxy
from orchestrator.errors import BadInput
from orchestrator.proxy import Backend, ProxyConfig, Server, Site, render, static_key
from orchestrator.rules import (
    MAX_HEALTH_PATH,
    check_certificate,
    check_health_path,
    check_proxy_port,
    check_site_name,
)
from workers.proxy import (
    STATE_KEY_FILE,
    HAProxyDriver,
    MemoryProxies,
    ProxyError,
    ServerState,
    parse_map,
    parse_servers_state,
    parse_sessions,
    passed,
)

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nMIIC\n" \
      "-----END PRIVATE KEY-----\n"
OTHER_PEM = PEM.replace("MIIB", "MIIX")


def base_config(**changes: object) -> ProxyConfig:
    """Two code services, web (two jobs, one draining, a health path) and api (one job), and
    one plain site."""
    config = ProxyConfig(
        bind="10.0.0.1", http_port=30000, https_port=30001,
        backends=(
            Backend("web", "/healthz", (Server("j1", "10.0.0.1", 20000),
                                         Server("j2", "10.0.0.2", 20001, draining=True))),
            Backend("api", None, (Server("j3", "10.0.0.2", 20002),)),
        ),
        sites=(Site("www.example.com", "web"),),
    )
    return replace(config, **changes)  # type: ignore[arg-type]


def with_backend(config: ProxyConfig, service: str, **changes: object) -> ProxyConfig:
    backends = tuple(replace(b, **changes) if b.service == service else b  # type: ignore[arg-type]
                     for b in config.backends)
    return replace(config, backends=backends)


# --- render -----------------------------------------------------------------------------------------


def test_render_without_tls_writes_the_config_and_the_three_lists() -> None:
    files = render(base_config())
    assert set(files) == {"haproxy.cfg", "sites.map", "tls.map", "certs.list"}
    assert files["sites.map"] == "www.example.com svc-web\n"
    assert files["tls.map"] == ""
    assert files["certs.list"] == ""


def test_render_writes_every_server_once_in_its_backend_draining_ones_with_weight_zero() -> None:
    cfg = render(base_config())["haproxy.cfg"].splitlines()
    assert "    server j1 10.0.0.1:20000 check inter 500 rise 1 fall 2" in cfg
    assert "    server j2 10.0.0.2:20001 check inter 500 rise 1 fall 2 weight 0" in cfg
    assert "    server j3 10.0.0.2:20002 check inter 500 rise 1 fall 2" in cfg
    # Each server sits in its own backend block: api (sorted first), then web.
    api, web = cfg.index("backend svc-api"), cfg.index("backend svc-web")
    assert api < cfg.index("    server j3 10.0.0.2:20002 check inter 500 rise 1 fall 2") < web
    assert web < cfg.index("    server j1 10.0.0.1:20000 check inter 500 rise 1 fall 2")
    assert sum(line.strip().startswith("server ") for line in cfg) == 3


def test_render_checks_a_health_path_over_http_and_others_by_tcp() -> None:
    cfg = render(base_config())["haproxy.cfg"]
    web = cfg[cfg.index("backend svc-web"):]
    api = cfg[cfg.index("backend svc-api"):cfg.index("backend svc-web")]
    assert "    option httpchk GET /healthz\n    http-check expect status 200-399\n" in web
    assert "httpchk" not in api and "http-check" not in api


def test_render_binds_both_ports_and_answers_404_for_unknown_sites() -> None:
    cfg = render(base_config())["haproxy.cfg"]
    assert "    bind 10.0.0.1:30000\n" in cfg
    assert "    bind 10.0.0.1:30001 ssl crt /run/orch-proxy/default.pem\n" in cfg  # no crt-list: no TLS site
    assert "map(/run/orch-proxy/sites.map,no-site)" in cfg
    assert "map(/run/orch-proxy/tls.map,no-site)" in cfg
    assert cfg.count("default_backend no-site") == 2
    assert "backend no-site\n    http-request return status 404" in cfg
    assert "stats socket /run/orch-proxy/admin.sock mode 600 level admin" in cfg


def test_render_of_tls_sites_lists_their_certificates_and_writes_each_one() -> None:
    config = base_config(sites=(Site("www.example.com", "web"), Site("shop.example.com", "api", pem=PEM),
                                Site("admin.example.com", "web", pem=OTHER_PEM)))
    files = render(config)
    assert set(files) == {"haproxy.cfg", "sites.map", "tls.map", "certs.list",
                          "certs/admin.example.com.pem", "certs/shop.example.com.pem"}
    # Every site on HTTP, only the TLS ones on HTTPS; sorted by name.
    assert files["sites.map"] == ("admin.example.com svc-web\nshop.example.com svc-api\n"
                                  "www.example.com svc-web\n")
    assert files["tls.map"] == "admin.example.com svc-web\nshop.example.com svc-api\n"
    assert files["certs.list"] == ("/run/orch-proxy/certs/admin.example.com.pem admin.example.com\n"
                                   "/run/orch-proxy/certs/shop.example.com.pem shop.example.com\n")
    assert files["certs/shop.example.com.pem"] == PEM
    assert files["certs/admin.example.com.pem"] == OTHER_PEM
    assert ("    bind 10.0.0.1:30001 ssl crt /run/orch-proxy/default.pem "
            "crt-list /run/orch-proxy/certs.list\n") in files["haproxy.cfg"]


def test_render_does_not_depend_on_the_order_backends_and_sites_are_given_in() -> None:
    config = base_config(sites=(Site("b.example.com", "web"), Site("a.example.com", "api", pem=PEM)))
    shuffled = replace(config, backends=config.backends[::-1], sites=config.sites[::-1])
    assert render(shuffled) == render(config)
    assert static_key(shuffled) == static_key(config)


def test_server_line_is_what_add_server_takes() -> None:
    assert proxy.server_line(Server("j", "10.0.0.9", 20123)) == "10.0.0.9:20123 check inter 500 rise 1 fall 2"
    assert proxy.server_line(Server("j", "10.0.0.9", 20123, draining=True)).endswith(" fall 2 weight 0")


def test_map_entries_hold_every_site_on_http_and_only_tls_sites_on_https() -> None:
    config = base_config(sites=(Site("www.example.com", "web"), Site("shop.example.com", "api", pem=PEM)))
    assert proxy.map_entries(config, tls=False) == {"www.example.com": "svc-web", "shop.example.com": "svc-api"}
    assert proxy.map_entries(config, tls=True) == {"shop.example.com": "svc-api"}


def test_wanted_servers_by_backend_and_name() -> None:
    wanted = proxy.wanted_servers(base_config())
    assert {b: set(servers) for b, servers in wanted.items()} == {"svc-web": {"j1", "j2"}, "svc-api": {"j3"}}
    assert wanted["svc-web"]["j2"] == Server("j2", "10.0.0.2", 20001, draining=True)


# --- static_key: what only a reload changes -------------------------------------------------------


@pytest.mark.parametrize("change", [
    pytest.param(lambda c: with_backend(c, "web", servers=()), id="servers-removed"),
    pytest.param(lambda c: with_backend(c, "web", servers=(Server("j9", "10.0.0.3", 20009),)), id="servers-replaced"),
    pytest.param(lambda c: with_backend(c, "web", servers=tuple(replace(s, draining=not s.draining)
                                                                 for s in c.backends[0].servers)),
                 id="draining-toggled"),
    pytest.param(lambda c: replace(c, sites=(*c.sites, Site("new.example.com", "api"))), id="plain-site-added"),
    pytest.param(lambda c: replace(c, sites=()), id="plain-site-removed"),
    pytest.param(lambda c: replace(c, sites=(Site("www.example.com", "api"),)), id="plain-site-repointed"),
])
def test_static_key_stays_when_only_servers_or_plain_sites_change(change: object) -> None:
    config = base_config()
    changed = change(config)  # type: ignore[operator]
    assert changed != config
    assert static_key(changed) == static_key(config)


@pytest.mark.parametrize("change", [
    pytest.param(lambda c: replace(c, backends=(*c.backends, Backend("new", None))), id="backend-added"),
    pytest.param(lambda c: replace(c, backends=c.backends[:1]), id="backend-removed"),
    pytest.param(lambda c: with_backend(c, "web", health_path="/ready"), id="health-path-changed"),
    pytest.param(lambda c: with_backend(c, "web", health_path=None), id="health-path-removed"),
    pytest.param(lambda c: with_backend(c, "api", health_path="/"), id="health-path-added"),
    pytest.param(lambda c: replace(c, sites=(*c.sites, Site("shop.example.com", "api", pem=PEM))),
                 id="tls-site-added"),
    pytest.param(lambda c: replace(c, sites=(Site("www.example.com", "web", pem=PEM),)), id="plain-site-gets-tls"),
    pytest.param(lambda c: replace(c, http_port=30002), id="http-port"),
    pytest.param(lambda c: replace(c, https_port=30003), id="https-port"),
    pytest.param(lambda c: replace(c, bind="10.0.0.9"), id="bind"),
])
def test_static_key_changes_with_what_needs_a_reload(change: object) -> None:
    config = base_config()
    assert static_key(change(config)) != static_key(config)  # type: ignore[operator]


def test_static_key_changes_when_a_certificate_changes_or_a_second_one_comes() -> None:
    one = base_config(sites=(Site("shop.example.com", "api", pem=PEM),))
    renewed = base_config(sites=(Site("shop.example.com", "api", pem=OTHER_PEM),))
    two = base_config(sites=(*one.sites, Site("admin.example.com", "web", pem=OTHER_PEM)))
    # The config file is the same in all three (crt-list is there already): the key still moves.
    assert render(one)["haproxy.cfg"] == render(renewed)["haproxy.cfg"] == render(two)["haproxy.cfg"]
    assert len({static_key(one), static_key(renewed), static_key(two)}) == 3
    # The second one leaving changes it back (its certificate must go).
    assert static_key(replace(two, sites=one.sites)) == static_key(one)


def test_static_key_of_a_tls_site_does_not_move_with_its_servers_or_its_backend() -> None:
    config = base_config(sites=(Site("shop.example.com", "api", pem=PEM),))
    moved = with_backend(replace(config, sites=(Site("shop.example.com", "web", pem=PEM),)), "web", servers=())
    assert static_key(moved) == static_key(config)
    assert len(static_key(config)) == 16


# --- the node writes the files -------------------------------------------------------------------


def test_prepare_writes_the_rendered_files_privately_and_drops_certificates_no_site_has(tmp_path: Path) -> None:
    driver = HAProxyDriver(tmp_path)
    config = base_config(sites=(Site("shop.example.com", "api", pem=PEM),))
    mounts = driver.prepare("p1", config)
    directory = tmp_path / "p1"
    assert mounts == {str(directory): "/run/orch-proxy"}
    for name, text in render(config).items():
        assert (directory / name).read_text() == text
        assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert (directory / STATE_KEY_FILE).read_text() == static_key(config)
    assert "PRIVATE KEY" in (directory / "default.pem").read_text()

    driver.prepare("p1", base_config())  # the TLS site is gone: so is its certificate
    assert not (directory / "certs" / "shop.example.com.pem").exists()
    assert (directory / "tls.map").read_text() == ""
    driver.remove("p1")
    assert not directory.exists()


# --- rules: site names, health paths, proxy ports --------------------------------------------------


@pytest.mark.parametrize(("name", "kept"), [
    ("app.example.com", "app.example.com"),
    ("App.Example.COM", "app.example.com"),
    ("app.example.com.", "app.example.com"),
    ("localhost", "localhost"),
    ("a-b.c0.example", "a-b.c0.example"),
    (".".join(["x" * 63] * 3) + "." + "x" * 61, ".".join(["x" * 63] * 3) + "." + "x" * 61),  # 253
])
def test_site_names_are_dns_names_kept_in_lower_case(name: str, kept: str) -> None:
    assert check_site_name(name) == kept


@pytest.mark.parametrize("name", [
    "", "*.example.com", "a..example.com", ".example.com", "-a.example.com", "a-.example.com",
    "a_b.example.com", "app example.com", "app.example.com/x", "x" * 64 + ".example.com",
    ".".join(["x" * 63] * 4),  # 255 characters
    "wéb.example.com", None, 42,
])
def test_other_site_names_are_refused(name: object) -> None:
    with pytest.raises(BadInput, match="is not a DNS name"):
        check_site_name(name)


@pytest.mark.parametrize("path", ["/", "/healthz", "/health/ready?full=1", "/a-b_c.d~e", "/%7Euser",
                                  "/" + "x" * (MAX_HEALTH_PATH - 1)])
def test_health_paths_are_url_paths(path: str) -> None:
    assert check_health_path(path) == path


@pytest.mark.parametrize("path", ["", "healthz", "/a b", '/a"b', "/a\nb", "/a#b", "/a\\b", "/a\tb",
                                  "/" + "x" * MAX_HEALTH_PATH, None, 1])
def test_other_health_paths_are_refused(path: object) -> None:
    with pytest.raises(BadInput, match="must be a URL path"):
        check_health_path(path)


def test_a_health_path_with_a_single_quote_is_refused() -> None:
    refused = False
    try:
        check_health_path("/it's")
    except BadInput:
        refused = True
    assert refused, "check_health_path accepted /it's"


@pytest.mark.parametrize("port", [1024, 19999, 20100, 30000, 65535])
def test_proxy_ports_outside_the_job_range(port: int) -> None:
    assert check_proxy_port(port, "--http-port", (20000, 20099)) == port


@pytest.mark.parametrize("port", [20000, 20050, 20099])
def test_a_proxy_port_in_the_job_range_is_refused(port: int) -> None:
    with pytest.raises(BadInput, match=rf"--https-port {port} is in the range jobs take their ports from "
                                       r"\(20000-20099\)"):
        check_proxy_port(port, "--https-port", (20000, 20099))


@pytest.mark.parametrize("port", [0, 80, 1023, 65536, -1, True, "30000", 30000.0, None])
def test_a_proxy_port_that_is_no_port_is_refused(port: object) -> None:
    with pytest.raises(BadInput, match="--http-port must be a port from 1024 to 65535"):
        check_proxy_port(port, "--http-port", (20000, 20099))


# --- rules: certificates ------------------------------------------------------------------------------


def pems(cert: trustme.LeafCert) -> tuple[str, str]:
    chain = "".join(blob.bytes().decode() for blob in cert.cert_chain_pems)
    return chain, cert.private_key_pem.bytes().decode()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_a_certificate_for_the_site_is_taken_and_its_chain_returned_without_the_key(ca: trustme.CA) -> None:
    chain, key = pems(ca.issue_cert("shop.example.com", "www.shop.example.com"))
    kept = check_certificate("shop.example.com", chain, key)
    assert "PRIVATE KEY" not in kept
    assert [c.subject for c in x509.load_pem_x509_certificates(kept.encode())] == \
        [c.subject for c in x509.load_pem_x509_certificates(chain.encode())]
    # The second name of its subjectAltName serves too.
    assert check_certificate("www.shop.example.com", chain, key) == kept


def test_a_certificate_chain_keeps_its_intermediate_in_order(ca: trustme.CA) -> None:
    intermediate = ca.create_child_ca()
    chain, key = pems(intermediate.issue_cert("shop.example.com"))
    kept = x509.load_pem_x509_certificates(check_certificate("shop.example.com", chain, key).encode())
    assert len(kept) == 2
    assert kept[0].subject != kept[1].subject and kept[0].issuer == kept[1].subject
    # The same chain with the key glued after it (one file) still yields certificates only.
    assert "PRIVATE KEY" not in check_certificate("shop.example.com", chain + key, key)


def test_a_wildcard_certificate_names_one_level_below_it(ca: trustme.CA) -> None:
    chain, key = pems(ca.issue_cert("*.example.com"))
    assert check_certificate("shop.example.com", chain, key)
    for site in ("example.com", "a.shop.example.com", "shop.example.org"):
        with pytest.raises(BadInput, match=rf"the certificate is for \*\.example\.com, not for {site}"):
            check_certificate(site, chain, key)


def test_a_certificate_for_another_name_is_refused(ca: trustme.CA) -> None:
    chain, key = pems(ca.issue_cert("shop.example.com", "www.example.com"))
    with pytest.raises(BadInput, match=re.escape("the certificate is for shop.example.com, www.example.com, not for "
                                                 "api.example.com")):
        check_certificate("api.example.com", chain, key)


def test_the_key_must_be_the_certificates(ca: trustme.CA) -> None:
    chain, _ = pems(ca.issue_cert("shop.example.com"))
    _, other_key = pems(ca.issue_cert("shop.example.com"))
    with pytest.raises(BadInput, match=re.escape("the key for shop.example.com does not match its certificate")):
        check_certificate("shop.example.com", chain, other_key)


def test_what_is_no_pem_certificate_or_key_is_refused(ca: trustme.CA) -> None:
    chain, key = pems(ca.issue_cert("shop.example.com"))
    for bad_cert in ("", "hello", key):
        with pytest.raises(BadInput, match=re.escape("the certificate for shop.example.com is not a PEM certificate")):
            check_certificate("shop.example.com", bad_cert, key)
    encrypted = serialization.load_pem_private_key(key.encode(), password=None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")).decode()
    for bad_key in ("", "hello", chain, encrypted):
        with pytest.raises(BadInput, match=re.escape("the key for shop.example.com is not an unencrypted PEM "
                                                     "private key")):
            check_certificate("shop.example.com", chain, bad_key)


def test_a_certificate_must_be_valid_now(ca: trustme.CA) -> None:
    chain, key = pems(ca.issue_cert("shop.example.com"))
    leaf = x509.load_pem_x509_certificates(chain.encode())[0]
    assert check_certificate("shop.example.com", chain, key, now=leaf.not_valid_before_utc)
    assert check_certificate("shop.example.com", chain, key, now=leaf.not_valid_after_utc)
    for when in (leaf.not_valid_after_utc + timedelta(seconds=1), datetime(3100, 1, 1, tzinfo=UTC),
                 leaf.not_valid_before_utc - timedelta(seconds=1)):
        with pytest.raises(BadInput, match=re.escape("the certificate for shop.example.com is not valid now")):
            check_certificate("shop.example.com", chain, key, now=when)


def test_without_now_an_expired_or_future_certificate_is_refused_against_the_clock(ca: trustme.CA) -> None:
    today = datetime.now(UTC).replace(microsecond=0)
    expired = pems(ca.issue_cert("shop.example.com", not_before=today - timedelta(days=30),
                                 not_after=today - timedelta(days=1)))
    future = pems(ca.issue_cert("shop.example.com", not_before=today + timedelta(days=1),
                                not_after=today + timedelta(days=30)))
    for chain, key in (expired, future):
        with pytest.raises(BadInput, match="is not valid now"):
            check_certificate("shop.example.com", chain, key)
    current = pems(ca.issue_cert("shop.example.com", not_before=today - timedelta(days=1),
                                 not_after=today + timedelta(days=1)))
    assert check_certificate("shop.example.com", *current)


def self_signed(common_name: str, *, san: list[str] | None) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1)))
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in san]),
                                        critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


def test_without_a_subject_alt_name_the_common_name_names_the_site() -> None:
    chain, key = self_signed("Shop.Example.com", san=None)
    assert check_certificate("shop.example.com", chain, key)
    with pytest.raises(BadInput, match=re.escape("not for www.example.com")):
        check_certificate("www.example.com", chain, key)


def test_with_a_subject_alt_name_the_common_name_does_not_count() -> None:
    chain, key = self_signed("shop.example.com", san=["www.example.com"])
    assert check_certificate("www.example.com", chain, key)
    with pytest.raises(BadInput, match=re.escape("the certificate is for www.example.com, not for shop.example.com")):
        check_certificate("shop.example.com", chain, key)


# --- the runtime API's answers --------------------------------------------------------------------

SERVERS_STATE = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight \
srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state \
bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr \
srv_agent_addr srv_agent_port
5 svc-web 1 aaa 127.0.0.1 2 8 1 1 0 15 3 2 6 0 0 0 - 20501 - 0 0 - - 0
5 svc-web 2 bbb 127.0.0.1 0 1 1 1 0 1 0 0 2 0 0 0 - 20502 - 0 0 - - 0
6 svc-api 1 ccc 10.0.0.2 2 0 1 1 7 15 3 2 6 0 0 0 - 20503 - 0 0 - - 0
6 svc-api 2 ddd 10.0.0.3 2 0 0 1 7 15 4 2 6 0 0 0 - 20504 - 0 0 - - 0
7 svc-old 1 eee 10.0.0.3 0 0 1 1 7 15 2 0 6 0 0 0 - 20505 - 0 0 - - 0
"""


def test_parse_servers_state_reads_each_server_line() -> None:
    states = parse_servers_state(SERVERS_STATE)
    assert states == [
        # running, passed, drain admin state (8)
        ServerState("svc-web", "aaa", "127.0.0.1", 20501, running=True, passed=True, drained=True),
        # stopped, maintenance (1), check not run
        ServerState("svc-web", "bbb", "127.0.0.1", 20502, running=False, passed=False, drained=True),
        ServerState("svc-api", "ccc", "10.0.0.2", 20503, running=True, passed=True, drained=False),
        # weight 0 (a draining server from the config file), a conditional pass (4)
        ServerState("svc-api", "ddd", "10.0.0.3", 20504, running=True, passed=True, drained=True),
        # check failed (2)
        ServerState("svc-old", "eee", "10.0.0.3", 20505, running=False, passed=False, drained=False),
    ]


def test_parse_servers_state_of_no_servers_or_an_error_is_empty() -> None:
    assert parse_servers_state("") == []
    assert parse_servers_state("1\n# be_id be_name srv_id\n") == []
    assert parse_servers_state("Can't find backend.\n") == []


def test_passed_needs_a_passed_check_and_a_running_server() -> None:
    states = parse_servers_state(SERVERS_STATE)
    assert passed(states, ["aaa", "bbb", "ccc", "eee", "zzz"]) == {"aaa", "ccc"}
    assert passed(states, []) == set()
    failing_but_running = ServerState("svc-web", "fff", "a", 1, running=True, passed=False, drained=False)
    assert passed([failing_but_running], ["fff"]) == set()


def test_parse_sessions_reads_current_sessions_of_servers_only() -> None:
    text = ("# pxname,svname,qcur,qmax,scur,smax,slim,stot,\n"
            "http,FRONTEND,,,4,10,262000,77,\n"
            "svc-web,aaa,0,0,3,5,,40,\n"
            "svc-web,bbb,0,0,0,1,,2,\n"
            "svc-web,BACKEND,0,0,3,5,,42,\n"
            "\n")
    assert parse_sessions(text) == {("svc-web", "aaa"): 3, ("svc-web", "bbb"): 0}
    assert parse_sessions("") == {}


def test_parse_map_reads_key_and_value_of_each_entry() -> None:
    text = ("0x55b451043880 app.example.com svc-web\n"
            "0x55b451043900 api.example.com svc-api\n"
            "\n")
    assert parse_map(text) == {"app.example.com": "svc-web", "api.example.com": "svc-api"}
    assert parse_map("") == {}


def test_memory_proxies_serve_the_wanted_config_and_fail_checks_on_failing_ports() -> None:
    proxies = MemoryProxies(failing={20001})
    with pytest.raises(ProxyError, match="proxy job p1 does not answer"):
        proxies.apply("p1", base_config)
    proxies.prepare("p1", replace(base_config(), backends=()))
    assert proxies.ready("p1") and proxies.servers("p1") == []
    assert proxies.apply("p1", base_config)
    states = {s.name: s for s in proxies.servers("p1")}
    assert set(states) == {"j1", "j2", "j3"}
    assert (states["j2"].passed, states["j2"].drained) == (False, True)
    assert passed(states.values(), ["j1", "j2", "j3"]) == {"j1", "j3"}
    proxies.remove("p1")
    assert not proxies.ready("p1") and proxies.servers("p1") == []

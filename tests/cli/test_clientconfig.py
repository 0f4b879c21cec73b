"""client-config: each client's files follow from the routing table and parse as their format.

TOML is checked with tomllib, JSON with json, YAML with PyYAML (installed with
uvicorn[standard]) and, for the small k3s and ConfigMap files, against the exact text.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mirrorrouter.cli.clientconfig import (
    CLIENTS,
    ClientConfig,
    ClientConfigError,
    default_mirror_url,
    generate,
    parse_mirror_url,
)
from mirrorrouter.cli.main import main
from mirrorrouter.config import Settings, parse_settings
from tests.support.testca import issue

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
MIRROR = "http://mirror.corp:5000"

CONFIG = """
[server]
port = 5001
[upstreams."docker.io"]
[upstreams."gcr.io"]
aliases = ["gcr.corp.example"]
[upstreams."quay.io"]
[upstreams."registry.corp:8443"]
[upstreams."ghcr.io"]
[[routes]]
prefix = "gcr"
upstream = "gcr.io"
[[routes]]
prefix = "mirrors/gcr"
upstream = "gcr.io"
[[routes]]
prefix = "quay"
upstream = "quay.io"
[[routes]]
host = "gcr.mirror.corp"
upstream = "gcr.io"
"""

REGISTRIES = [
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "gcr.io",
    "gcr.corp.example",
    "quay.io",
    "registry.corp:8443",
    "ghcr.io",
]


def settings(text: str = CONFIG) -> Settings:
    return parse_settings(text)


def files(config: ClientConfig) -> dict[str, str]:
    return {f.relpath: f.content for f in config.files}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "mirrors.toml"
    path.write_text(CONFIG)
    return path


# --------------------------------------------------------------------------- the mirror URL


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("0.0.0.0", 5000, "http://localhost:5000"),
        ("::", 5000, "http://localhost:5000"),
        ("10.1.2.3", 6000, "http://10.1.2.3:6000"),
        ("mirror.corp", 5000, "http://mirror.corp:5000"),
        ("::1", 5000, "http://[::1]:5000"),
    ],
)
def test_default_mirror_url_comes_from_server(host: str, port: int, expected: str) -> None:
    """http://<server.host>:<server.port>, localhost for a wildcard, brackets for IPv6."""
    text = f'[server]\nhost = "{host}"\nport = {port}\n[upstreams."docker.io"]\n'
    assert default_mirror_url(settings(text)) == expected
    assert parse_mirror_url(expected).url == expected


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mirror.corp:5000", "must start with http:// or https://"),
        ("ftp://mirror.corp", "must start with http:// or https://"),
        ("http://", "names no host"),
        ("http://mirror.corp:5000/gcr", "no path"),
        ("http://mirror.corp:5000/?ns=gcr.io", "no path, query or fragment"),
        ("http://alice:secret@mirror.corp", "must not carry credentials"),
        ("http://mirror.corp:99999", "not a valid URL"),
        ("http://mirror_corp:5000", "not a host[:port]"),
    ],
)
def test_bad_mirror_urls_are_refused_with_a_reason(url: str, says: str) -> None:
    with pytest.raises(ClientConfigError, match=re.escape(says)):
        parse_mirror_url(url)


def test_mirror_url_may_end_with_a_slash_and_use_https() -> None:
    mirror = parse_mirror_url("https://mirror.corp/")
    assert (mirror.url, mirror.authority, mirror.insecure) == (
        "https://mirror.corp",
        "mirror.corp",
        False,
    )


def test_cli_refuses_a_bad_mirror_url(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["client-config", "--for", "docker", "--config", str(config_file)]
    code, out, err = run([*argv, "--mirror-url", "http://mirror.corp:5000/hub"], capsys)
    assert code == 2 and out == ""
    assert "mirrorrouter: client-config: mirror URL 'http://mirror.corp:5000/hub'" in err


@pytest.mark.parametrize("client", CLIENTS)
def test_every_client_works_with_the_shipped_config(
    client: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default mirrors.toml: every client, default URL, output on stdout."""
    code, out, err = run(
        ["client-config", "--for", client, "--config", str(ROOT / "mirrors.toml")], capsys
    )
    assert code == 0
    assert "localhost:5000" in out
    assert "pass --mirror-url" in err  # the default URL is a loopback name


# --------------------------------------------------------------------------- containerd


def test_containerd_one_hosts_toml_per_registry_and_alias() -> None:
    """Each file names the mirror as server and as the one [host], which pulls and resolves."""
    config = generate(settings(), "containerd", MIRROR)
    generated = files(config)
    assert list(generated) == [f"{r}/hosts.toml" for r in REGISTRIES]
    assert [f.path for f in config.files] == [
        f"/etc/containerd/certs.d/{r}/hosts.toml" for r in REGISTRIES
    ]
    for text in generated.values():
        assert tomllib.loads(text) == {
            "server": MIRROR,
            "host": {MIRROR: {"capabilities": ["pull", "resolve"]}},
        }
    assert "(an alias of gcr.io)" in generated["gcr.corp.example/hosts.toml"]


def test_containerd_default_only_with_allow_unconfigured() -> None:
    text = CONFIG.replace(
        "[server]", '[routing]\nallow_unconfigured = ["*.corp.example"]\n[server]'
    )
    generated = files(generate(settings(text), "containerd", "https://mirror.corp"))
    assert "_default/hosts.toml" in generated
    assert tomllib.loads(generated["_default/hosts.toml"])["server"] == "https://mirror.corp"
    assert "*.corp.example" in generated["_default/hosts.toml"]
    assert "_default/hosts.toml" not in files(generate(settings(), "containerd", MIRROR))


def test_containerd_stdout_names_each_path(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On stdout every file follows a '# /etc/containerd/certs.d/<registry>/hosts.toml' line."""
    argv = ["client-config", "--for", "containerd", "--config", str(config_file)]
    code, out, err = run([*argv, "--mirror-url", MIRROR], capsys)
    assert code == 0
    chunks = re.split(r"^# (/etc/containerd/certs\.d/\S+/hosts\.toml)\n", out, flags=re.M)
    assert chunks[0] == ""
    paths, texts = chunks[1::2], chunks[2::2]
    assert paths == [f"/etc/containerd/certs.d/{r}/hosts.toml" for r in REGISTRIES]
    assert all(tomllib.loads(t)["server"] == MIRROR for t in texts)
    assert "config_path" in err and "--hosts-dir" in err


def test_containerd_output_dir_writes_registry_directories(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "certs.d"
    argv = ["client-config", "--for", "containerd", "--config", str(config_file)]
    code, out, _ = run([*argv, "--mirror-url", MIRROR, "--output-dir", str(out_dir)], capsys)
    assert code == 0
    written = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("hosts.toml"))
    assert written == sorted(f"{r}/hosts.toml" for r in REGISTRIES)
    assert f"wrote {out_dir / 'docker.io' / 'hosts.toml'}" in out.splitlines()
    text = (out_dir / "registry.corp:8443" / "hosts.toml").read_text()
    assert tomllib.loads(text)["host"] == {MIRROR: {"capabilities": ["pull", "resolve"]}}


# --------------------------------------------------------------------------- docker


def test_docker_daemon_json(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """stdout is the JSON alone; how to pull other registries goes to stderr."""
    argv = ["client-config", "--for", "docker", "--config", str(config_file)]
    code, out, err = run([*argv, "--mirror-url", MIRROR], capsys)
    assert code == 0
    assert json.loads(out) == {
        "registry-mirrors": [MIRROR],
        "insecure-registries": ["mirror.corp:5000", "gcr.mirror.corp:5000"],
    }
    assert "gcr.io: docker pull mirror.corp:5000/gcr/<repository>:<tag>" in err
    assert "mirror.corp:5000/mirrors/gcr/<repository>:<tag>" in err
    assert "mirror.corp:5000/gcr.io/<repository>:<tag>" in err
    assert "gcr.mirror.corp:5000/<repository>:<tag>" in err
    assert "registry.corp:8443: cannot be named" in err
    assert all(line.startswith("# ") for line in err.splitlines())


def test_docker_https_needs_no_insecure_registries() -> None:
    config = generate(settings(), "docker", "https://mirror.corp")
    assert json.loads(config.files[0].content) == {"registry-mirrors": ["https://mirror.corp"]}
    assert config.files[0].path == "/etc/docker/daemon.json"


def test_docker_no_registry_mirrors_when_the_default_is_not_docker_hub() -> None:
    """registry-mirrors sends bare docker.io names, which go to the default registry."""
    text = CONFIG.replace("[server]", '[routing]\ndefault_registry = "gcr.io"\n[server]')
    config = generate(settings(text), "docker", MIRROR)
    assert "registry-mirrors" not in json.loads(config.files[0].content)
    assert any("routing.default_registry (gcr.io)" in n for n in config.notes)


# --------------------------------------------------------------------------- podman


def podman_registries(text: str) -> dict[str, dict[str, Any]]:
    data = tomllib.loads(text)
    assert set(data) == {"registry"}
    return {r["prefix"]: r for r in data["registry"]}


def test_podman_registries_conf() -> None:
    """Default registry at the root; others at their first named prefix, else their host."""
    config = generate(settings(), "podman", MIRROR)
    (file,) = config.files
    assert file.path == "/etc/containers/registries.conf.d/50-mirrorrouter.conf"
    registries = podman_registries(file.content)
    expected = {
        # Named even for the default registry: at the root a prefix would take docker.io/gcr/x.
        "docker.io": "mirror.corp:5000/docker.io",
        "index.docker.io": "mirror.corp:5000/docker.io",
        "registry-1.docker.io": "mirror.corp:5000/docker.io",
        "gcr.io": "mirror.corp:5000/gcr",
        "gcr.corp.example": "mirror.corp:5000/gcr",
        "quay.io": "mirror.corp:5000/quay",
        "ghcr.io": "mirror.corp:5000/ghcr.io",
    }
    assert set(registries) == set(expected)  # registry.corp:8443 cannot be a path component
    for prefix, location in expected.items():
        assert registries[prefix]["location"] == prefix
        assert registries[prefix]["mirror"] == [{"location": location, "insecure": True}]
    assert "Not listed: registry.corp:8443" in file.content


def test_podman_https_and_a_default_registry_other_than_docker_hub() -> None:
    text = CONFIG.replace("[server]", '[routing]\ndefault_registry = "quay.io"\n[server]')
    registries = podman_registries(
        generate(settings(text), "podman", "https://m.corp").files[0].content
    )
    assert registries["quay.io"]["mirror"] == [{"location": "m.corp/quay"}]
    assert registries["docker.io"]["mirror"] == [{"location": "m.corp/docker.io"}]


# --------------------------------------------------------------------------- k3s

K3S_EXPECTED = """\
# k3s registries.yaml: every registry mirrorrouter serves, through http://m:5000. Generated
# by `mirrorrouter client-config --for k3s`.
mirrors:
  "docker.io":
    endpoint:
      - "http://m:5000"
  "index.docker.io":
    endpoint:
      - "http://m:5000"
  "registry-1.docker.io":
    endpoint:
      - "http://m:5000"
  "registry.corp:5000":
    endpoint:
      - "http://m:5000"
  "*":
    endpoint:
      - "http://m:5000"
"""


def test_k3s_registries_yaml_exact_text() -> None:
    text = """
[routing]
allow_unconfigured = ["*.corp"]
[upstreams."docker.io"]
[upstreams."registry.corp:5000"]
"""
    (file,) = generate(settings(text), "k3s", "http://m:5000").files
    assert file.path == "/etc/rancher/k3s/registries.yaml"
    assert file.content == K3S_EXPECTED


def test_k3s_registries_yaml_parses() -> None:
    (file,) = generate(settings(), "k3s", MIRROR).files
    assert yaml.safe_load(file.content) == {
        "mirrors": {registry: {"endpoint": [MIRROR]} for registry in REGISTRIES}
    }


# --------------------------------------------------------------------------- kind

CONFIGMAP_EXPECTED = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: "local-registry-hosting"
  namespace: "kube-public"
data:
  "localRegistryHosting.v1": |
    host: "mirror.corp:5000"
    help: "https://kind.sigs.k8s.io/docs/user/local-registry/"
"""


def test_kind_cluster_mounts_hosts_toml_and_sets_config_path() -> None:
    config = generate(settings(), "kind", MIRROR, kind_hosts_dir="/srv/hosts")
    generated = files(config)
    cluster = yaml.safe_load(generated["kind-cluster.yaml"])
    assert cluster["kind"] == "Cluster"
    assert cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    (patch,) = cluster["containerdConfigPatches"]
    assert tomllib.loads(patch) == {
        "plugins": {
            "io.containerd.grpc.v1.cri": {"registry": {"config_path": "/etc/containerd/certs.d"}}
        }
    }
    assert cluster["nodes"] == [
        {
            "role": "control-plane",
            "extraMounts": [
                {
                    "hostPath": "/srv/hosts",
                    "containerPath": "/etc/containerd/certs.d",
                    "readOnly": True,
                }
            ],
        }
    ]
    for registry in REGISTRIES:
        file = next(f for f in config.files if f.relpath == f"certs.d/{registry}/hosts.toml")
        assert file.path == f"/srv/hosts/{registry}/hosts.toml"
        assert tomllib.loads(file.content)["server"] == MIRROR
    configmap = generated["local-registry-hosting.yaml"]
    assert configmap.endswith(CONFIGMAP_EXPECTED)
    data = yaml.safe_load(configmap)
    assert data["metadata"] == {"name": "local-registry-hosting", "namespace": "kube-public"}
    assert yaml.safe_load(data["data"]["localRegistryHosting.v1"]) == {
        "host": "mirror.corp:5000",
        "help": "https://kind.sigs.k8s.io/docs/user/local-registry/",
    }


def test_kind_output_dir_points_host_path_at_the_written_files(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "kind"
    argv = ["client-config", "--for", "kind", "--config", str(config_file)]
    code, _, err = run([*argv, "--output-dir", str(out_dir)], capsys)
    assert code == 0
    cluster = yaml.safe_load((out_dir / "kind-cluster.yaml").read_text())
    host_path = cluster["nodes"][0]["extraMounts"][0]["hostPath"]
    assert host_path == str(out_dir.resolve() / "certs.d")
    assert (Path(host_path) / "docker.io" / "hosts.toml").is_file()
    assert (out_dir / "local-registry-hosting.yaml").is_file()
    # The default URL is localhost:5001 ([server].port), which Kind nodes cannot reach.
    assert tomllib.loads((Path(host_path) / "quay.io" / "hosts.toml").read_text())["server"] == (
        "http://localhost:5001"
    )
    assert "inside a Kind node is the node itself" in err


def test_kind_stdout_is_every_file_with_its_path(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["client-config", "--for", "kind", "--config", str(config_file), "--mirror-url", MIRROR]
    code, out, err = run(argv, capsys)
    assert code == 0
    headers = re.findall(r"^# (\S+\.(?:yaml|toml))$", out, flags=re.M)
    assert headers[0] == "kind-cluster.yaml"
    assert headers[-1] == "local-registry-hosting.yaml"
    assert headers[1:-1] == [f"/srv/kind/certs.d/{r}/hosts.toml" for r in REGISTRIES]
    assert "node itself" not in err


def test_unknown_client_is_an_error() -> None:
    with pytest.raises(ClientConfigError, match="unknown client 'lima'"):
        generate(settings(), "lima", MIRROR)


# --------------------------------------------------------------------------- a private CA

HTTPS = "https://mirror.corp:8443"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_default_mirror_url_is_https_on_the_tls_port(tmp_path: Path) -> None:
    """With [server.tls], the default mirror URL is https:// on its port."""
    cert = issue(tmp_path, "mirror", issue(tmp_path, "ca"))
    text = (
        f'[server.tls]\nport = 8443\ncertificate = "{cert.cert_path}"\n'
        f'key = "{cert.key_path}"\n[upstreams."docker.io"]\n'
    )
    assert default_mirror_url(settings(text)) == "https://localhost:8443"


def test_containerd_trusts_the_ca_beside_each_hosts_toml() -> None:
    """Each registry directory gets ca.crt, named (relative to the file) for the host and the
    server alike."""
    found = files(generate(settings(), "containerd", HTTPS, ca=CA_PEM))
    for registry in REGISTRIES:
        assert found[f"{registry}/ca.crt"] == CA_PEM
        hosts = tomllib.loads(found[f"{registry}/hosts.toml"])
        assert hosts["ca"] == "ca.crt"
        assert hosts["host"][HTTPS]["ca"] == "ca.crt"


def test_kind_mounts_the_ca_with_the_hosts_toml_files() -> None:
    """Kind nodes get the CA through the same mounted certs.d directory."""
    found = files(generate(settings(), "kind", HTTPS, kind_hosts_dir="/srv/kind", ca=CA_PEM))
    assert found["certs.d/docker.io/ca.crt"] == CA_PEM
    assert tomllib.loads(found["certs.d/docker.io/hosts.toml"])["ca"] == "ca.crt"
    assert '- hostPath: "/srv/kind"' in found["kind-cluster.yaml"]


def test_docker_and_podman_certs_d_by_host_and_port(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Docker gets certs.d/<host:port>/ca.crt for the mirror and each Host route (written by
    --output-dir only: stdout stays daemon.json); podman certs.d/<host:port>/ca.crt."""
    docker = generate(settings(), "docker", HTTPS, ca=CA_PEM)
    assert set(files(docker)) == {
        "daemon.json",
        "certs.d/mirror.corp:8443/ca.crt",
        "certs.d/gcr.mirror.corp:8443/ca.crt",
    }
    assert json.loads(docker.render()) == {"registry-mirrors": [HTTPS]}
    podman = files(generate(settings(), "podman", HTTPS, ca=CA_PEM))
    assert podman["certs.d/mirror.corp:8443/ca.crt"] == CA_PEM
    assert "insecure" not in podman["50-mirrorrouter.conf"]


def test_k3s_names_the_ca_file_for_the_mirror_endpoint() -> None:
    """k3s: configs."<host:port>".tls.ca_file names the CA file written beside it."""
    found = files(generate(settings(), "k3s", HTTPS, ca=CA_PEM))
    parsed = yaml.safe_load(found["registries.yaml"])
    assert parsed["configs"] == {
        "mirror.corp:8443": {"tls": {"ca_file": "/etc/rancher/k3s/mirrorrouter-ca.crt"}}
    }
    assert found["mirrorrouter-ca.crt"] == CA_PEM


def test_no_ca_for_plain_http_and_a_note_without_one() -> None:
    """A CA is not written for an http:// mirror; an https:// one without a CA says how to
    give one."""
    plain = generate(settings(), "containerd", MIRROR, ca=CA_PEM)
    assert not any(f.relpath.endswith("ca.crt") for f in plain.files)
    assert any("plain HTTP" in n for n in plain.notes)
    bare = generate(settings(), "containerd", HTTPS)
    assert any("--ca FILE" in n for n in bare.notes)


def test_cli_ca_option_and_the_self_signed_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ca FILE is written as given; without it a self-signed server certificate is its own
    CA; a --ca that is no certificate is refused naming it."""
    ca = issue(tmp_path, "ca")
    config = tmp_path / "mirrors.toml"
    config.write_text(
        f'[server.tls]\nport = 8443\ncertificate = "{ca.cert_path}"\nkey = "{ca.key_path}"\n'
        '[upstreams."docker.io"]\n'
    )
    argv = ["client-config", "--for", "podman", "--config", str(config), "--mirror-url", HTTPS]
    for extra in ([], ["--ca", str(ca.cert_path)]):
        out = tmp_path / f"out{len(extra)}"
        code, _, err = run([*argv, *extra, "--output-dir", str(out)], capsys)
        assert code == 0, err
        written = (out / "certs.d/mirror.corp:8443/ca.crt").read_text()
        assert written == ca.cert_path.read_text()
    code, _, err = run([*argv, "--ca", str(config)], capsys)
    assert code == 2
    assert f"--ca {config}: no PEM certificate in it" in err
